"""Finding containerd's CRI folder of a container from its snapshot mounts."""

from __future__ import annotations

from pathlib import Path

from hotrestart.checkpoint.hot import cri_container_dir
from hotrestart.runtime.mounts import Mount


def test_found_from_the_overlay_options(tmp_path: Path) -> None:
    root = tmp_path / "var-lib-containerd"
    folder = root / "io.containerd.grpc.v1.cri" / "containers" / "c1"
    folder.mkdir(parents=True)
    snapshots = root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    overlay = Mount(
        "overlay",
        "overlay",
        (f"workdir={snapshots}/9/work", f"upperdir={snapshots}/9/fs", f"lowerdir={snapshots}/2/fs:{snapshots}/1/fs"),
    )
    assert cri_container_dir((overlay,), "c1") == str(folder)
    assert cri_container_dir((overlay,), "other") == "", "not a CRI container: no folder"
    assert cri_container_dir((Mount("bind", "/srv/rootfs", ("rbind",)),), "c1") == ""
