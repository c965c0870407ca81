"""The container's own filesystem changes, carried with its checkpoint.

Capture (`capture.py`) reads the overlay upper directory of the container (and carried
emptyDir volumes): files, directories, symlinks and FIFOs go into a tar; overlay whiteouts
(0:0 character devices) and opaque directories are listed beside it (`changes.py`), since
they mean "deleted" rather than content. Replay (`replay.py`) applies that onto the new
container's mounted root before restore.

Every byte here is the container's: the shim is root and the container (or another
container of the pod sharing a volume) may change the tree while it is walked. So:

- nothing is ever looked up by path from the host's root: each component is opened
  relative to its parent's descriptor with O_NOFOLLOW, so a directory swapped for a
  symlink mid-walk fails that open instead of leading out of the tree;
- symlinks are stored and recreated as links, never followed; ownership, modes and times
  are set on descriptors (or with no-follow calls), never through a path that may have
  become a link;
- owners are numeric: no name lookup, so nothing of the container's (nsswitch.conf, NSS
  modules) is ever read or loaded, and there is no chroot;
- only regular files, directories, symlinks and FIFOs are carried; devices and sockets
  are not (a device node is recreated by nobody: the new container's device rules apply).
"""

from __future__ import annotations

from hotrestart.checkpoint.rootfs.capture import capture
from hotrestart.checkpoint.rootfs.changes import Changes, load_changes
from hotrestart.checkpoint.rootfs.replay import apply

__all__ = ["Changes", "apply", "capture", "load_changes"]
