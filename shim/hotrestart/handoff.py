"""What the short-lived verbs (`start`, `delete`) and the long-running shim hand each other.

Both sides import these names from here, so the daemon and the Task service never depend
on the verbs' module.
"""

from __future__ import annotations

# `start` passes the bound pod socket to a shim it launches as this inherited descriptor.
LISTEN_FD_ENV = "HOTRESTART_LISTEN_FD"
# In the bundle: the runc binary and root the shim used, for `delete` after the shim is gone.
OPTIONS_FILE = "options.json"
# In the bundle: the container's init pid, which `delete` reports.
INIT_PID_FILE = "init.pid"
