"""The real test bed of the end-to-end tests: a private containerd, runc and CRIU.

Installed by ``hack/install-testbed.sh`` into /opt/hotrestart-testbed (or
$HOTRESTART_TESTBED); see containerd.py for what an instance owns.
"""

from .containerd import ContainerdInstance
from .errors import TestbedError
from .images import BUSYBOX_IMAGE, PAUSE_IMAGE, build_images
from .layout import BIN_DIR, CONTAINERD_17_BIN_DIR, HOTRESTART_RUNTIME_TYPE, NAMESPACE, TESTBED
from .pods import POD_NAMESPACE, make_pod_config, unique_pod_name

__all__ = [
    "BIN_DIR",
    "BUSYBOX_IMAGE",
    "CONTAINERD_17_BIN_DIR",
    "HOTRESTART_RUNTIME_TYPE",
    "NAMESPACE",
    "PAUSE_IMAGE",
    "POD_NAMESPACE",
    "TESTBED",
    "ContainerdInstance",
    "TestbedError",
    "build_images",
    "make_pod_config",
    "unique_pod_name",
]
