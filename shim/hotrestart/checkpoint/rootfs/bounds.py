"""What every walk of a container's tree shares: its bounds, and opening directories by
descriptor only (see the package's notes)."""

from __future__ import annotations

import os

MAX_DEPTH = 256  # directory levels (one descriptor each while walking)
MAX_ENTRIES = 1_000_000  # files, directories and links in one tree
MAX_NAME = 255
MAX_PATH = 4096

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: str) -> int:
    """A descriptor of the directory `path`, which must not itself be a symlink."""
    return os.open(path, DIR_FLAGS)
