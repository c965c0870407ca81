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

from hotrestart.install import containerd_setup, restart, state, store_key, versions
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
    key = store_key.render(settings.store_key_source) if settings.store_key_source else None
    _check_key(fs, settings, key, recorded)
    planned = containerd_setup.plan(fs, settings, recorded, say)
    name = versions.version_name(bundle_dir)
    versions.install(fs, settings.install_dir, bundle_dir, name, say)
    versions.switch(fs, settings.install_dir, name, say)
    versions.remove_unused(fs, settings.install_dir, name, say)
    if fs.make_dirs(settings.store, 0o700):
        say(f"store: created {settings.store} (0700)")
    else:
        say(f"store: {settings.store} exists")
    recorded = recorded or _record_original(fs, settings, planned, say)
    folders = [f for f in _missing_folders(fs, settings, planned, key) if f not in recorded.made]
    config_changed, main_written, dropin_written = containerd_setup.apply(fs, settings, planned, say)
    key_changed, key_written = _store_key(fs, settings, key, recorded, say)
    # What this run wrote is ours; a main file it left alone keeps the earlier record, so that
    # an admin's edit since the install is never taken for ours (and undone) by the uninstall.
    main_changed = planned.edited is not None and planned.edited != planned.main
    recorded = dataclasses.replace(
        recorded,
        config_written=main_written if main_changed or not recorded.config_written else recorded.config_written,
        dropin_written=dropin_written,
        store_key=settings.store_key if key_written else "",
        store_key_written=key_written,
        made=(*recorded.made, *folders),
        restart_pending=recorded.restart_pending or config_changed or key_changed,
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
    changed = _remove_key(fs, recorded, say) or changed
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


def _missing_folders(fs: HostFS, settings: Settings, planned: containerd_setup.Plan, key: bytes | None) -> list[str]:
    """The host folders that our files outside the install folder will need made, outermost
    first (uninstall removes them, innermost first, once empty)."""
    files = [settings.containerd_config] if planned.main is None else []
    files += [settings.containerd_dropin] if planned.dropin is not None else []
    files += [settings.store_key] if key else []
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


def _ours(existing: bytes, settings: Settings, recorded: State | None) -> bool:
    """Whether the key file holding `existing` is the one an earlier run wrote, unchanged."""
    return (
        recorded is not None
        and recorded.store_key == settings.store_key
        and sha256(existing) == recorded.store_key_written
    )


def _check_key(fs: HostFS, settings: Settings, key: bytes | None, recorded: State | None) -> None:
    """Refuse, before the host is touched, to replace a store key the installer did not write:
    the checkpoints sealed with it could no longer be opened."""
    if key is None:
        return
    existing = fs.read(settings.store_key)
    if existing is None or existing == key or _ours(existing, settings, recorded):
        return
    raise InstallError(
        f"{settings.store_key} holds another store key, not written by the installer: give the installer "
        "that key, or move the file away (checkpoints sealed with it need it to restore)"
    )


def _store_key(fs: HostFS, settings: Settings, data: bytes | None, recorded: State, say: Say) -> tuple[bool, str]:
    """Copy the store key to the host (or take away one we copied before and no longer
    should); whether it changed, and the sha256 of what is ours there ("" when the file was
    there before us: used, and left in place by the uninstall)."""
    if data is not None:
        existing = fs.read(settings.store_key)
        if existing is not None and not _ours(existing, settings, recorded):
            say(f"store key: {settings.store_key} already holds this key (not the installer's: kept on uninstall)")
            return False, ""
        if fs.write(settings.store_key, data, 0o600):
            say(f"store key: written to {settings.store_key} (0600) from {settings.store_key_source}")
            return True, sha256(data)
        say(f"store key: {settings.store_key} is up to date")
        return False, sha256(data)
    if recorded.store_key:
        return _remove_key(fs, recorded, say), ""
    return False, ""


def _remove_key(fs: HostFS, recorded: State | None, say: Say) -> bool:
    if recorded is None or not recorded.store_key:
        return False
    data = fs.read(recorded.store_key)
    if data is None:
        return False
    if sha256(data) != recorded.store_key_written:
        say(f"store key: {recorded.store_key} was changed since the install, left as it is")
        return False
    fs.remove(recorded.store_key)
    say(f"store key: removed {recorded.store_key}")
    return True
