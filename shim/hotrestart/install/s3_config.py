"""An object store's AWS config file, from the installer's mounted Secret to the host file the
runtime's `S3ConfigFile` names.

Read as a Secret volume's file (a link into the volume's own folder is followed, no other),
at most 64 KiB, a regular file of the user we run as, and parsed as the shim will parse it
(an INI file with the profile's section) before a byte reaches the host.
"""

from __future__ import annotations

import configparser
import os
import stat

from hotrestart.install.errors import InstallError
from hotrestart.install.store_key import resolve_secret

MAX_CONFIG = 64 << 10


def render(source: str) -> bytes:
    """The bytes for the host's copy of the config at `source`."""
    what = f"HOTRESTART_S3_CONFIG_SOURCE: {source}"
    path = resolve_secret(source, "HOTRESTART_S3_CONFIG_SOURCE")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(f"{what}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InstallError(f"{what}: not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise InstallError(f"{what}: must belong to uid {os.geteuid()} and be writable by it alone")
        data = f.read(MAX_CONFIG + 1)
    if len(data) > MAX_CONFIG:
        raise InstallError(f"{what}: larger than {MAX_CONFIG} bytes")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(data.decode("utf-8"), source=source)
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise InstallError(f"{what}: not an AWS config file: {' '.join(str(exc).split())[:300]}") from None
    if not parser.sections():
        raise InstallError(f"{what}: no profile ([default] or [profile NAME])")
    return data
