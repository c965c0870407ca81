"""Opening the store as configured: its root, its key, and whether it may go without one.

The shim (runtime options, containerd's environment) and the `hotrestart` command (flags,
the same environment) open the store the same way, so both refuse the same stores, and
`backend` is the one place that decides what kind of store a root names.
"""

from __future__ import annotations

import dataclasses
import os

from hotrestart.store import keyfile, locality
from hotrestart.store.backend import Backend
from hotrestart.store.seal import KeyRing
from hotrestart.store.store import Store

KEY_ENV = "HOTRESTART_STORE_KEY"
ALLOW_UNAUTHENTICATED_ENV = "HOTRESTART_ALLOW_UNAUTHENTICATED"


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def backend(root: str, keys: KeyRing | None, s3_config_file: str = "") -> Backend:
    """The store at `root`: an S3 bucket for `s3://bucket/prefix` (with the settings of
    `s3_config_file` when given), else a directory tree (a local path or a shared mount)."""
    if root.startswith("s3://"):
        from hotrestart.store.objectstore import ObjectStore  # only object store nodes load its client

        return ObjectStore(root, keys=keys, config_file=s3_config_file)
    if "://" in root:
        raise ValueError(f"checkpoint store {root!r}: only s3:// URLs and directories are stores")
    return Store(root, keys=keys)


def key_ring(key_file: str = "") -> KeyRing | None:
    """The store key ring from `key_file` or HOTRESTART_STORE_KEY; None when neither names
    one. Raises SealError (or OSError) for a key that cannot be loaded."""
    key_file = key_file or os.environ.get(KEY_ENV, "")
    return keyfile.load(key_file) if key_file else None


def open_store(root: str, key_file: str = "", allow_unauthenticated: bool = False, s3_config_file: str = "") -> Backend:
    """The store at `root`, with its key ring when a key file is given (or named by
    HOTRESTART_STORE_KEY). Raises SealError for a key that cannot be loaded, and for a store
    that is not node-local with no key, unless unauthenticated checkpoints are allowed."""
    allow = allow_unauthenticated or _truthy(os.environ.get(ALLOW_UNAUTHENTICATED_ENV, ""))
    ring = key_ring(key_file)
    locality.require_key(root, ring, allow)
    return backend(root, ring, s3_config_file)


@dataclasses.dataclass(frozen=True, slots=True)
class StoreSource:
    """How a store was opened, so that a helper process can open the same one."""

    root: str
    key_file: str = ""
    allow_unauthenticated: bool = False
    s3_config_file: str = ""

    def open(self) -> Backend:
        return open_store(self.root, self.key_file, self.allow_unauthenticated, self.s3_config_file)
