"""Node-local stores: the filesystem under a path from mountinfo, and when a store key is required."""

from __future__ import annotations

from pathlib import Path

import pytest
from storekit import ring_of

from hotrestart.store import locality
from hotrestart.store.locality import filesystem_type, require_key
from hotrestart.store.seal import SealError

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
30 22 0:40 / /var/lib/shared rw,relatime shared:10 - nfs4 srv:/export rw,vers=4.2
31 30 8:2 / /var/lib/shared/local rw,relatime shared:11 - xfs /dev/sdb1 rw
32 22 0:41 / /mnt/sshfs rw,nosuid,nodev shared:12 - fuse.sshfs user@host:/ rw,user_id=0
33 22 0:42 / /mnt/with\040space rw - cifs //srv/share rw
34 22 0:43 / /mnt/local\040disk rw - btrfs /dev/sdc1 rw
35 22 0:44 / /mnt/stack rw - nfs srv:/a rw
36 22 0:45 / /mnt/stack rw - tmpfs tmpfs rw
37 22 0:46 / /mnt/nooptional rw - ceph 10.0.0.1:/ rw
38 22 0:47 / /var/lib/sharedX rw master:3 propagate_from:2 unbindable - virtiofs tag rw
"""


@pytest.fixture
def mountinfo(tmp_path: Path) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return str(path)


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/var/lib/hotrestart/store", "ext4"),
        ("/", "ext4"),
        ("/var/lib/shared", "nfs4"),
        ("/var/lib/shared/store", "nfs4"),
        ("/var/lib/shared/local/store", "xfs"),  # longest prefix wins
        ("/var/lib/shared/localx", "nfs4"),  # on component boundaries only
        ("/var/lib/sharedX/store", "virtiofs"),
        ("/mnt/sshfs/store", "fuse.sshfs"),
        ("/mnt/with space/store", "cifs"),
        ("/mnt/local disk", "btrfs"),
        ("/mnt/stack/store", "tmpfs"),  # of two at one point, the later is on top
        ("/mnt/nooptional/x", "ceph"),
        ("/var/lib/shared/local/../store", "nfs4"),  # resolved first
    ],
)
def test_filesystem_type(mountinfo: str, path: str, fstype: str) -> None:
    assert filesystem_type(path, mountinfo=mountinfo) == fstype


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("/var/lib/hotrestart/store", True),
        ("/var/lib/shared/local/store", True),
        ("/mnt/local disk/store", True),
        ("/var/lib/shared/store", False),
        ("/mnt/sshfs/store", False),
        ("/mnt/with space/store", False),
        ("/mnt/nooptional", False),
        ("/var/lib/sharedX", False),
        ("s3://bucket/prefix", False),
    ],
)
def test_require_key(mountinfo: str, path: str, local: bool) -> None:
    require_key(path, ring_of("k1"), False, mountinfo=mountinfo)
    require_key(path, None, True, mountinfo=mountinfo)
    if local:
        require_key(path, None, False, mountinfo=mountinfo)
        assert locality.node_local(path, mountinfo=mountinfo)
    else:
        with pytest.raises(SealError, match="needs a store key, or unauthenticated checkpoints allowed"):
            require_key(path, None, False, mountinfo=mountinfo)
        assert not locality.node_local(path, mountinfo=mountinfo)


def test_unreadable_mountinfo_is_not_node_local(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="cannot tell which filesystem"):
        require_key("/var/lib/store", None, False, mountinfo=str(tmp_path / "absent"))
    (tmp_path / "mountinfo").write_text("garbage\n")
    with pytest.raises(SealError, match="no mount"):
        require_key("/var/lib/store", None, False, mountinfo=str(tmp_path / "mountinfo"))


def test_this_machine(tmp_path: Path) -> None:
    assert filesystem_type(str(tmp_path))  # the real /proc/self/mountinfo parses
