"""The install and uninstall flows, step by step, each step said in one line.

Both are idempotent: a step whose result is in place already changes nothing, and containerd
is restarted only when its configuration or the store key changed in this run. A second
install, or a second uninstall, changes nothing at all.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable

from hotrestart.install import containerd_setup, restart, s3_config, state, store_key, versions
from hotrestart.install.errors import InstallError
from hotrestart.install.hostfs import MAX_FILE, HostFS
from hotrestart.install.settings import Settings
from hotrestart.install.state import State, sha256

Say = Callable[[str], None]


def install(settings: Settings, bundle_dir: str, say: Say) -> str:
    """Install the bundle at `bundle_dir`; the installed version's name."""
    fs = HostFS(settings.host_root)
    recorded = _earlier(fs, settings)
    # Everything that can be refused is, before the host is touched.
    key = _Copied(
        "store key",
        settings.store_key,
        settings.store_key_source,
        store_key.render(settings.store_key_source) if settings.store_key_source else None,
        recorded.store_key if recorded else "",
        recorded.store_key_written if recorded else "",
    )
    conf = _Copied(
        "S3 config",
        settings.s3_config,
        settings.s3_config_source,
        s3_config.render(settings.s3_config_source) if settings.s3_config_source else None,
        recorded.s3_config if recorded else "",
        recorded.s3_config_written if recorded else "",
    )
    _check_copy(fs, key, "checkpoints sealed with it need it to restore")
    _check_copy(fs, conf, "it may be another store's")
    planned = containerd_setup.plan(fs, settings, recorded, say)
    name = versions.version_name(bundle_dir)
    versions.install(fs, settings.install_dir, bundle_dir, name, say)
    versions.switch(fs, settings.install_dir, name, say)
    versions.remove_unused(fs, settings.install_dir, name, say)
    if not settings.local_store:
        say(f"store: {settings.store} (an object store)")
    elif fs.make_dirs(settings.store, 0o700):
        say(f"store: created {settings.store} (0700)")
    else:
        say(f"store: {settings.store} exists")
    recorded = recorded or _record_original(fs, settings, planned, say)
    folders = [f for f in _missing_folders(fs, settings, planned, (key, conf)) if f not in recorded.made]
    config_changed, main_written, dropin_written = containerd_setup.apply(fs, settings, planned, say)
    key_changed, key_written = _copy(fs, key, say)
    conf_changed, conf_written = _copy(fs, conf, say)
    # What this run wrote is ours; a main file it left alone keeps the earlier record, so that
    # an admin's edit since the install is never taken for ours (and undone) by the uninstall.
    main_changed = planned.edited is not None and planned.edited != planned.main
    recorded = dataclasses.replace(
        recorded,
        config_written=main_written if main_changed or not recorded.config_written else recorded.config_written,
        dropin_written=dropin_written,
        store_key=settings.store_key if key_written else "",
        store_key_written=key_written,
        s3_config=settings.s3_config if conf_written else "",
        s3_config_written=conf_written,
        made=(*recorded.made, *folders),
        restart_pending=recorded.restart_pending or config_changed or key_changed or conf_changed,
    )
    state.save(fs, settings.install_dir, recorded)
    _restart_if_pending(fs, settings, recorded, say)
    return name


def _restart_if_pending(fs: HostFS, settings: Settings, recorded: State, say: Say) -> None:
    """Restart containerd when a change is waiting for it, this run's or an earlier one's whose
    restart failed; the state says so until it succeeds."""
    if not recorded.restart_pending:
        say("containerd: configuration unchanged, not restarted")
        return
    restart.restart_containerd(settings, say)
    state.save(fs, settings.install_dir, dataclasses.replace(recorded, restart_pending=False))


def uninstall(settings: Settings, say: Say) -> list[str]:
    """Undo the install; the versions left behind because processes still use them."""
    fs = HostFS(settings.host_root)
    recorded = state.load(fs, settings.install_dir)
    original = state.original(fs, settings.install_dir, MAX_FILE) if recorded else None
    changed = containerd_setup.undo(fs, settings, recorded, original, say)
    if recorded is not None:
        changed = _remove_copy(fs, "store key", recorded.store_key, recorded.store_key_written, say) or changed
        changed = _remove_copy(fs, "S3 config", recorded.s3_config, recorded.s3_config_written, say) or changed
    for folder in reversed(recorded.made if recorded else ()):
        if fs.remove_empty_dir(folder):
            say(f"folder: removed {folder} (made by the install, empty now)")
    if recorded is not None:
        recorded = dataclasses.replace(recorded, restart_pending=recorded.restart_pending or changed)
        state.save(fs, settings.install_dir, recorded)
        _restart_if_pending(fs, settings, recorded, say)
    elif changed:
        restart.restart_containerd(settings, say)
    else:
        say("containerd: configuration unchanged, not restarted")
    if fs.remove_tree(state.state_dir(settings.install_dir)):
        say("state: removed")
    left = remove_versions(settings, say)
    if settings.local_store:
        say(f"store: {settings.store} left in place with its checkpoints (remove it by hand if they are not wanted)")
    return left


def remove_versions(settings: Settings, say: Say) -> list[str]:
    """Remove the installed versions no process uses, and the install folder once empty;
    the versions still in use."""
    fs = HostFS(settings.host_root)
    left = versions.remove_unused(fs, settings.install_dir, None, say)
    if not left:
        # `current` goes last: until then a shim still running from the bundle may be started
        # again through it (containerd's `delete` verb for a pod it forgets).
        if fs.remove(versions.current_link(settings.install_dir)):
            say(f"current: removed {versions.current_link(settings.install_dir)}")
        fs.remove_empty_dir(versions.versions_dir(settings.install_dir))
        if fs.remove_empty_dir(settings.install_dir):
            say(f"install folder: removed {settings.install_dir}")
    return left


def _missing_folders(
    fs: HostFS, settings: Settings, planned: containerd_setup.Plan, copies: tuple[_Copied, ...]
) -> list[str]:
    """The host folders that our files outside the install folder will need made, outermost
    first (uninstall removes them, innermost first, once empty)."""
    files = [settings.containerd_config] if planned.main is None else []
    files += [settings.containerd_dropin] if planned.dropin is not None else []
    files += [c.path for c in copies if c.data is not None]
    missing: list[str] = []
    for path in files:
        folder = os.path.dirname(path)
        chain = []
        while folder != "/" and fs.lstat(folder) is None:
            chain.append(folder)
            folder = os.path.dirname(folder)
        missing += [f for f in reversed(chain) if f not in missing]
    return missing


def _earlier(fs: HostFS, settings: Settings) -> State | None:
    """The state of an earlier install, when its settings are the ones given now."""
    recorded = state.load(fs, settings.install_dir)
    if recorded is None:
        return None
    dropin = settings.containerd_dropin if recorded.method == containerd_setup.DROPIN else ""
    for what, then, now in (
        ("HOTRESTART_CONTAINERD_CONFIG", recorded.containerd_config, settings.containerd_config),
        ("HOTRESTART_CONTAINERD_DROPIN", recorded.dropin, dropin),
        ("HOTRESTART_RUNTIME_NAME", recorded.runtime_name, settings.runtime_name),
    ):
        if then != now:
            raise InstallError(f"{what} was {then!r} at install and is {now!r} now: uninstall first")
    return recorded


def _record_original(fs: HostFS, settings: Settings, planned: containerd_setup.Plan, say: Say) -> State:
    """A new install's state, keeping containerd's main file as it is before we change it."""
    st = fs.lstat(settings.containerd_config)
    data = planned.main
    if data is not None:
        data = containerd_setup.original_without_us(data, settings)
    recorded = State(
        containerd_config=settings.containerd_config,
        config_existed=data is not None,
        config_mode=stat.S_IMODE(st.st_mode) if st is not None else 0o644,
        method=planned.method,
        dropin=settings.containerd_dropin if planned.method == containerd_setup.DROPIN else "",
        runtime_name=settings.runtime_name,
    )
    state.save_original(fs, settings.install_dir, data)
    state.save(fs, settings.install_dir, recorded)  # after the original: its presence says it is kept
    kept = "its bytes" if data is not None else "that there was none"
    say(f"state: recorded {settings.containerd_config} as it was before the install ({kept})")
    return recorded


@dataclasses.dataclass(frozen=True, slots=True)
class _Copied:
    """A file the installer copies from a Secret to the host: the store key, the S3 config."""

    what: str
    path: str  # on the host; "" when not configured
    source: str
    data: bytes | None  # what goes there; None: nothing (and a copy of ours is taken away)
    recorded: str  # the host path an earlier run copied to ("" when none)
    written: str  # the sha256 of what it wrote there

    def ours(self, existing: bytes) -> bool:
        """Whether `existing` is what an earlier run wrote to this path, unchanged."""
        return bool(self.recorded) and self.recorded == self.path and sha256(existing) == self.written


def _check_copy(fs: HostFS, c: _Copied, why: str) -> None:
    """Refuse, before the host is touched, to replace such a file the installer did not write."""
    if c.data is None:
        return
    existing = fs.read(c.path)
    if existing is None or existing == c.data or c.ours(existing):
        return
    raise InstallError(
        f"{c.path} holds another {c.what}, not written by the installer: give the installer "
        f"that {c.what}, or move the file away ({why})"
    )


def _copy(fs: HostFS, c: _Copied, say: Say) -> tuple[bool, str]:
    """Copy a file to the host (or take away one we copied before and no longer should);
    whether it changed, and the sha256 of what is ours there ("" when the file was there
    before us: used, and left in place by the uninstall)."""
    if c.data is not None:
        existing = fs.read(c.path)
        if existing is not None and not c.ours(existing):
            say(f"{c.what}: {c.path} already holds this {c.what} (not the installer's: kept on uninstall)")
            return False, ""
        if fs.write(c.path, c.data, 0o600):
            say(f"{c.what}: written to {c.path} (0600) from {c.source}")
            return True, sha256(c.data)
        say(f"{c.what}: {c.path} is up to date")
        return False, sha256(c.data)
    if c.recorded:
        return _remove_copy(fs, c.what, c.recorded, c.written, say), ""
    return False, ""


def _remove_copy(fs: HostFS, what: str, path: str, written: str, say: Say) -> bool:
    if not path:
        return False
    data = fs.read(path)
    if data is None:
        return False
    if sha256(data) != written:
        say(f"{what}: {path} was changed since the install, left as it is")
        return False
    fs.remove(path)
    say(f"{what}: removed {path}")
    return True
