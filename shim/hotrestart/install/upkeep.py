"""Store upkeep while the installer waits: `hotrestart prune` on the host's store, on a timer.

Abandoned and damaged checkpoints go, and with HOTRESTART_RETENTION_MAX_AGE / _MAX_SIZE the
old and the over-budget ones. A failed prune is reported and tried again next time: the
store's upkeep never takes the runtime's installer down.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hotrestart.errors import ShimError
from hotrestart.install import store_key
from hotrestart.install.errors import InstallError
from hotrestart.install.hostfs import HostFS
from hotrestart.install.settings import Settings
from hotrestart.store import config, keyfile


def prune(settings: Settings, say: Callable[[str], None]) -> None:
    fs = HostFS(settings.host_root)
    try:
        # The store and the key are opened by path below the host root: no link on the way.
        if settings.local_store:
            with fs.folder(settings.store):
                pass
        keys = None
        if settings.store_key:
            with fs.folder(os.path.dirname(settings.store_key)):
                pass
            if fs.lstat(settings.store_key) is not None:
                keys = keyfile.load(settings.on_host(settings.store_key))
        if settings.local_store:
            store = config.backend(settings.on_host(settings.store), keys)
        else:
            # The installer's own copy of the S3 config: the host's is the same bytes.
            conf = store_key.resolve_secret(settings.s3_config_source, "HOTRESTART_S3_CONFIG_SOURCE")
            store = config.backend(settings.store, keys, conf if settings.s3_config_source else "")
        removed = store.prune(max_age=settings.retention_max_age, max_bytes=settings.retention_max_size)
    except (OSError, ShimError, InstallError) as exc:
        say(f"prune: failed: {exc}")
        return
    for entry in removed:
        say(f"prune: removed {entry.state} {entry.id}" + (f" ({entry.fault.value})" if entry.fault else ""))
    for problem in store.problems():
        say(f"prune: store: {problem}")
