"""Registering the runtime with the host's containerd, and taking it out again.

containerd 2.x: a drop-in file, imported by the main file. containerd 1.7: a block at the
end of the main file, since 1.7 lets an imported file replace a plugin's whole section. Either
way the host's containerd reads the result before anything is restarted, and its merged
configuration must be what it was plus our runtime; otherwise our change is put back.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any

from hotrestart import node_config
from hotrestart.errors import InvalidArgumentError
from hotrestart.install import config_edit, containerd_host, hostexec, toml_text
from hotrestart.install import containerd_config as cc
from hotrestart.install.errors import InstallError
from hotrestart.install.hostfs import HostFS
from hotrestart.install.settings import Settings
from hotrestart.install.state import State, sha256

Say = Callable[[str], None]
DROPIN = "dropin"  # containerd 2.x
BLOCK = "block"  # containerd 1.7


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What the install will write, worked out before anything on the host is touched."""

    method: str
    main: bytes | None  # containerd's main file as it is (None: there is none)
    edited: bytes | None  # the main file as it will be; None: as it is
    dropin: bytes | None  # the drop-in (DROPIN only)
    before: Mapping[str, Any] | None = None  # containerd's merged view now; None: no containerd to ask


def plan(fs: HostFS, settings: Settings, recorded: State | None, say: Say) -> Plan:
    """Refuses (InstallError) a configuration it cannot change exactly, before any change."""
    main_path = settings.containerd_config
    main = fs.read(main_path)
    text = toml_text.decode(main, main_path) if main is not None else None
    declared = cc.version_of(text, main_path) if text is not None else None
    major = containerd_host.major(settings.host_root)
    # containerd's merged view as it is: what must stay as it is, and runc's cgroup driver.
    before: Mapping[str, Any] | None = None
    if major is not None:
        before = containerd_host.merged(settings.host_root, main_path if text is not None else None)
    if major is None:
        # Only containerd 2.x reads version 3, and a drop-in is safe with it; version 2 may be
        # 1.7's, which an import would break. Without containerd to ask, only 3 is certain.
        if declared != 3:
            raise InstallError(
                f"containerd is not on the host's PATH ({hostexec.HOST_PATH}): cannot tell whether it is 1.7 "
                f"or 2.x, which take the runtime differently ({main_path} "
                + ("does not exist)" if declared is None else "says version 2)")
            )
        say("containerd: not on the host's PATH; config version 3 is containerd 2.x's")
        major = 2
    method = DROPIN if major >= 2 else BLOCK
    if recorded is not None and recorded.method != method:
        raise InstallError(f"containerd is {major}.x now, another major version than at install: uninstall first")
    version = declared or cc.version_for_containerd(major)
    if method == BLOCK and version != 2:
        raise InstallError(f"{main_path} says config version {version}; containerd {major}.x reads version 2 only")
    base = config_edit.without_block(text) if text is not None else None
    parsed = toml_text.parse(base, main_path) if base is not None else {}
    runtime = cc.Runtime(
        name=settings.runtime_name,
        install_dir=settings.install_dir,
        store=settings.store,
        store_key=settings.store_key,
        s3_config=settings.s3_config,
        systemd_cgroup=_systemd_cgroup(settings, before if before is not None else parsed, say),
    )
    if method == DROPIN:
        edited = config_edit.add_import(text, settings.containerd_dropin, version=version, config_path=main_path)
        dropin: bytes | None = cc.render_dropin(version, runtime).encode()
    else:
        assert before is not None  # 1.x: containerd answered
        block = cc.render_block(runtime, cc.default_runtimes(parsed, before, settings.runtime_name))
        edited = config_edit.add_block(text, block, version=version, config_path=main_path)
        dropin = None
    return Plan(method, main, edited.encode() if edited is not None else None, dropin, before)


def _systemd_cgroup(settings: Settings, config: Mapping[str, Any], say: Say) -> bool:
    """auto: as containerd's runc runtime has it, since the kubelet's cgroup driver already
    works with runc's; when that cannot be read, systemd where the host has cgroup v2."""
    if settings.systemd_cgroup != "auto":
        return settings.systemd_cgroup == "true"
    runc = cc.runc_systemd_cgroup(config)
    if runc is not None:
        say(f"SystemdCgroup: {str(runc).lower()}, as containerd's runc runtime has it")
        return runc
    v2 = os.path.exists(settings.on_host("/sys/fs/cgroup/cgroup.controllers"))
    say(f"SystemdCgroup: {str(v2).lower()} (cgroup {'v2' if v2 else 'v1'} on the host)")
    return v2


def original_without_us(data: bytes, settings: Settings) -> bytes:
    """A main file with our import or block taken out: what was there before us, when an
    earlier install left them and no state (a state folder lost)."""
    text = toml_text.decode(data, settings.containerd_config)
    where = settings.containerd_config
    text = config_edit.remove_import(text, settings.containerd_dropin, config_path=where) or text
    text = config_edit.remove_block(text, config_path=where) or text
    return text.encode()


def apply(fs: HostFS, settings: Settings, planned: Plan, say: Say) -> tuple[bool, str, str]:
    """Write what `plan` worked out; whether anything changed, and the sha256 of the main
    file and the drop-in as left."""
    main_path, dropin_path = settings.containerd_config, settings.containerd_dropin
    dropin_before = fs.read(dropin_path) if planned.dropin is not None else None
    after = planned.edited if planned.edited is not None else planned.main
    main_changes = planned.edited is not None and planned.edited != planned.main
    dropin_changes = planned.dropin is not None and planned.dropin != dropin_before
    hashes = sha256(after), sha256(planned.dropin)
    if planned.dropin is not None and not dropin_changes:
        say(f"drop-in: {dropin_path} is up to date")
    if not main_changes:
        what = "imports the drop-in" if planned.method == DROPIN else "has our runtime's block"
        say(f"containerd config: {main_path} {what} already")
    if not main_changes and not dropin_changes:
        return False, *hashes
    before = planned.before
    if before is None:
        say("containerd: not on the host's PATH: its merged configuration is not checked")
    try:
        if planned.dropin is not None and dropin_changes:
            fs.write(dropin_path, planned.dropin, 0o644)
            say(f"drop-in: written: {dropin_path}")
        if main_changes and after is not None:
            st = fs.lstat(main_path)
            fs.write(main_path, after, stat.S_IMODE(st.st_mode) if st else 0o644)
            what = "import added to" if planned.method == DROPIN else "runtime block written in"
            say(f"containerd config: {'created' if planned.main is None else what} {main_path}")
        if before is not None:
            _check(settings, before, containerd_host.merged(settings.host_root, main_path))
    except BaseException:
        _put_back(fs, main_path, planned.main, dropin_path, dropin_before, planned.dropin is not None)
        say("containerd config: put back as it was")
        raise
    return True, *hashes


def _check(settings: Settings, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """containerd's merged view after: ours there as written, nothing else changed."""
    try:
        found = node_config.registered(after).get(settings.runtime_name)
    except InvalidArgumentError as exc:
        raise InstallError(f"containerd's merged configuration: {exc}") from None
    expected = os.path.join(settings.install_dir, "current", "bin", "containerd-shim-hotrestart-v2")
    if found is None or found.runtime_path != expected:
        raise InstallError(
            f"containerd's merged configuration has no runtime {settings.runtime_name} of type "
            f"{node_config.SHIM_TYPE} with runtime_path {expected} (is a file imported after ours replacing it?)"
        )
    changed = cc.differences(before, after, settings.runtime_name)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise InstallError(f"with our change containerd's merged configuration would also change {shown}")


def _put_back(
    fs: HostFS, main_path: str, main: bytes | None, dropin_path: str, dropin: bytes | None, has_dropin: bool
) -> None:
    restore = [(main_path, main)] + ([(dropin_path, dropin)] if has_dropin else [])
    for path, data in restore:
        if data is None:
            fs.remove(path)
        else:
            st = fs.lstat(path)
            fs.write(path, data, stat.S_IMODE(st.st_mode) if st else 0o644)


def undo(fs: HostFS, settings: Settings, recorded: State | None, original: bytes | None, say: Say) -> bool:
    """Take our runtime out of containerd's configuration; whether anything changed.
    `original`: the main file as it was before the first install (recorded.config_existed)."""
    changed = _undo_main(fs, settings, recorded, original, say)
    return _remove_dropin(fs, settings, recorded, say) or changed


def _undo_main(fs: HostFS, settings: Settings, recorded: State | None, original: bytes | None, say: Say) -> bool:
    main_path = recorded.containerd_config if recorded else settings.containerd_config
    current = fs.read(main_path)
    dropin = recorded.dropin if recorded else settings.containerd_dropin
    if (
        recorded is not None
        and current is not None
        and sha256(current) == recorded.config_written
        # Byte for byte only when the original is what the file is without our edit: an
        # admin's change made since must survive the uninstall.
        and (not recorded.config_existed or _without_us(current, dropin, main_path, original) == original)
    ):
        if not recorded.config_existed:
            fs.remove(main_path)
            say(f"containerd config: removed {main_path} (there was none before the install)")
            return True
        if original is None:
            raise InstallError(f"the original of {main_path} is missing from the install's state: not restored")
        if original == current:
            say(f"containerd config: {main_path} is as it was before the install")
            return False
        fs.write(main_path, original, recorded.config_mode)
        say(f"containerd config: {main_path} restored byte for byte")
        return True
    if current is None:
        say(f"containerd config: {main_path} does not exist, nothing to undo")
        return False
    text = toml_text.decode(current, main_path)
    edited = _without_us(current, dropin, main_path, original).decode()
    if edited == text:
        say(f"containerd config: {main_path} has nothing of ours, left as it is")
        return False
    st = fs.lstat(main_path)
    fs.write(main_path, edited.encode(), stat.S_IMODE(st.st_mode) if st else 0o644)
    say(f"containerd config: {main_path} was changed since the install: took out only what we added")
    return True


def _without_us(data: bytes, dropin: str, main_path: str, original: bytes | None) -> bytes:
    """The main file with our import and our block taken out (each only if there); an
    `imports` line the original had stays, emptied."""
    text = toml_text.decode(data, main_path)
    if dropin:
        keep_line = original is not None and _has_imports(original, main_path)
        text = config_edit.remove_import(text, dropin, config_path=main_path, keep_line=keep_line) or text
    return (config_edit.remove_block(text, config_path=main_path) or text).encode()


def _has_imports(data: bytes, main_path: str) -> bool:
    try:
        return "imports" in toml_text.parse(toml_text.decode(data, main_path), main_path)
    except InstallError:
        return False


def _remove_dropin(fs: HostFS, settings: Settings, recorded: State | None, say: Say) -> bool:
    path = recorded.dropin if recorded else settings.containerd_dropin
    data = fs.read(path) if path else None
    if data is None:
        return False
    if recorded is None and not data.startswith(cc.HEADER.encode()):
        say(f"drop-in: {path} was not written by hotrestart install, left as it is")
        return False
    fs.remove(path)
    say(f"drop-in: removed {path}")
    return True
