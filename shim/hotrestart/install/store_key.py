"""The store key, from the installer's mounted Secret to the host file the runtime names.

The source is read as the shim reads a key (`store.keyfile`: a key file or a key folder; at
most 64 KiB; no FIFOs or devices; root's and private), and the host gets the keys it holds in
the key-file format, active key first. Writing what was parsed rather than the bytes read
means the host never receives anything but keys, and the same keys always give the same file.
"""

from __future__ import annotations

import base64
import os

from hotrestart.install.errors import InstallError
from hotrestart.store import keyfile
from hotrestart.store.seal import SealError


def resolve_secret(source: str, setting: str = "HOTRESTART_STORE_KEY_SOURCE") -> str:
    """A Secret volume's file is a link into the volume's own folder (`key -> ..data/key`):
    followed while it stays in that folder, refused when it leads anywhere else."""
    if not os.path.islink(source):
        return source
    folder = os.path.realpath(os.path.dirname(source))
    target = os.path.realpath(source)
    if os.path.dirname(target) == folder or target.startswith(folder + os.sep):
        return target
    raise InstallError(f"{setting}: {source} links outside its folder (to {target})")


def render(source: str) -> bytes:
    """The host key file for the keys at `source`. The source must belong to the user we run
    as (root on a node): a key others could have written is not one to seal with."""
    try:
        ring = keyfile.load(resolve_secret(source), owner=os.geteuid())
    except SealError as exc:
        raise InstallError(f"HOTRESTART_STORE_KEY_SOURCE: {exc}") from None
    lines = [f"{name}:{base64.b64encode(ring.key(name)).decode()}" for name in ring.names]
    return ("\n".join(lines) + "\n").encode()
