"""Test images, built offline by hack/build-test-image.py from busybox-static."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILDER = REPO_ROOT / "hack" / "build-test-image.py"

BUSYBOX_IMAGE = "hotrestart.test/busybox:latest"
PAUSE_IMAGE = "hotrestart.test/pause:latest"
DEFAULT_BUSYBOX = Path("/bin/busybox")


@cache
def builder() -> ModuleType:
    """hack/build-test-image.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location("hotrestart_build_test_image", BUILDER)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {BUILDER}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    assert mod.BUSYBOX_IMAGE == BUSYBOX_IMAGE and mod.PAUSE_IMAGE == PAUSE_IMAGE
    return mod


def build_images(output: Path, busybox: Path = DEFAULT_BUSYBOX) -> Path:
    """Write the OCI archive with the busybox and pause images to ``output``."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} is missing (apt-get install busybox-static)")
    builder().build(output, busybox)
    return output
