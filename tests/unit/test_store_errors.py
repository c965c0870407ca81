"""The store's errors: one root under ShimError, and still what callers outside catch."""

from __future__ import annotations

import errno

import pytest

from hotrestart.errors import Code, ShimError, StoreError, status_for
from hotrestart.store.archive import IntegrityError
from hotrestart.store.manifest import ManifestError, UnsupportedManifestError
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.seal import SealError

ERRORS = [
    IntegrityError("images/pages.img.zst: stored bytes do not match the manifest"),
    ManifestError("manifest has no schema"),
    UnsupportedManifestError("manifest schema 'hotrestart.io/checkpoint/v2' is newer than this version reads"),
    SealError("checkpoint c-1 is sealed and this node has no store key"),
    UnsafeEntryError("c-1", "is a symbolic link, not a folder"),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
def test_every_store_error_maps_through_the_one_root(exc: Exception) -> None:
    assert isinstance(exc, StoreError) and isinstance(exc, ShimError)
    assert status_for(exc) == (Code.FAILED_PRECONDITION, str(exc))


def test_errors_stay_catchable_as_before() -> None:
    # Callers outside the store suppress OSError around store changes and catch ValueError
    # around manifests: both must still see these.
    unsafe = UnsafeEntryError("c-1", "is a FIFO")
    assert isinstance(unsafe, OSError) and unsafe.errno == errno.EPERM
    assert (unsafe.what, unsafe.why, str(unsafe)) == ("c-1", "is a FIFO", "[Errno 1] c-1: is a FIFO")
    assert isinstance(ManifestError("x"), ValueError)
    assert isinstance(UnsupportedManifestError("x"), ManifestError)
    assert not isinstance(IntegrityError("x"), OSError | ValueError)
    assert not isinstance(SealError("x"), OSError | ValueError)
