"""A checkpoint's memory must fit the new container's limit before anything is decompressed."""

from __future__ import annotations

import time

from hotrestart.checkpoint.restore import MEMORY_SLACK, beyond_memory_limit
from hotrestart.store.manifest import FileEntry, Identity, Manifest


def _manifest(images: int, rootfs: int) -> Manifest:
    return Manifest(
        id="x",
        identity=Identity("ns", "web-0", "app"),
        created_at=time.time(),
        node="n",
        reason="stop",
        image="img",
        spec_digest="d",
        runtime={},
        network={},
        files=[
            FileEntry("images/pages-1.img.zst", "0" * 64, 1, images),
            FileEntry("rootfs-diff.tar.zst", "0" * 64, 1, rootfs),
        ],
        timings={},
    )


def _spec(limit: object) -> dict[str, object]:
    return {"linux": {"resources": {"memory": {"limit": limit}}}}


def test_memory_images_beyond_the_limit_are_refused() -> None:
    gib = 1 << 30
    assert "exceed the container's memory limit" in beyond_memory_limit(_manifest(2 * gib, 0), _spec(gib))
    # Files restored to disk do not count; the limit leaves room for CRIU's own records.
    assert beyond_memory_limit(_manifest(gib + MEMORY_SLACK, 50 * gib), _spec(gib)) == ""
    # No limit, or a malformed one, caps nothing here (free space still does).
    for spec in ({}, _spec(None), _spec(0), _spec(True), _spec("1G"), {"linux": {"resources": {"memory": 5}}}):
        assert beyond_memory_limit(_manifest(100 * gib, 0), spec) == ""
