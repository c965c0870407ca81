"""Where the test bed is installed, and the names and limits its instances share."""

from __future__ import annotations

import os
from pathlib import Path

TESTBED = Path(os.environ.get("HOTRESTART_TESTBED", "/opt/hotrestart-testbed"))
BIN_DIR = TESTBED / "bin"
CONTAINERD_17_BIN_DIR = TESTBED / "containerd-1.7" / "bin"
CNI_BIN_DIR = Path("/usr/lib/cni")
LOCK_DIR = Path("/run/hotrestart-testbed")
NAMESPACE = "k8s.io"
HOTRESTART_RUNTIME_TYPE = "io.containerd.hotrestart.v2"
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
SHIM_PREFIX = "containerd-shim"
# Set in containerd's environment, hence in every shim's (and the shim
# zygote's): identifies the runtime processes of an instance even when their
# command line does not name it.
MARKER_ENV = "HOTRESTART_TESTBED_INSTANCE"
# containerd's cgroup driver for the instances of a run: "cgroupfs" (default) or "systemd".
CGROUP_DRIVER_ENV = "HOTRESTART_E2E_CGROUP_DRIVER"
# The hotrestart shim forks pod shims from a zygote listening here; one per
# instance keeps instances (and test runs) apart and lets stop() end it.
ZYGOTE_SOCKET_ENV = "HOTRESTART_ZYGOTE_SOCKET"
MAX_NET_SLOTS = 32
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
