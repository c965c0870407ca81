"""Fixtures every tier may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import objstore


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """The S3 environment of the test bed's Ceph RADOS Gateway (started on first use)."""
    with objstore.running() as env:
        yield env
