"""containerd's configuration: which version it speaks, and the tables that register us.

For containerd 2.x the runtime goes in a drop-in file the main file imports; for 1.7, whose
imports replace whole plugin sections (the CRI plugin's included: the administrator's
settings and the default runc runtime would be lost), in a block at the end of the main file
(see config_edit). Both hold the same tables, rendered here. `differences` compares
containerd's merged view before and after: nothing but our runtime may change.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from hotrestart.install import config_edit, toml_text
from hotrestart.install.errors import InstallError
from hotrestart.node_config import SHIM_TYPE, runtime_options

# Where the CRI plugin keeps its runtimes, per config version (containerd 1.7: 2; 2.x: 3).
RUNTIMES_TABLE = {
    2: 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes',
    3: "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes",
}
HEADER = "# Written by `hotrestart install` and removed by `hotrestart uninstall`; edits here are overwritten.\n"
POD_ANNOTATIONS = ("hotrestart.io/*",)


def version_of(text: str, where: str) -> int:
    """The config version a main file declares: 2 or 3. Version 1 (no `version`), and any
    other value, are refused: containerd reads them differently, and we would write a
    drop-in it misreads."""
    version = toml_text.parse(text, where).get("version")
    if version is None:
        raise InstallError(
            f"{where} has no `version`: config version 1 is not supported; "
            "migrate it (`containerd config migrate`) and run the install again"
        )
    if isinstance(version, bool) or version not in (2, 3):
        raise InstallError(f"{where}: config version {version!r} is not supported (2 for containerd 1.7, 3 for 2.x)")
    return int(version)


def containerd_major(version_output: str) -> int:
    """containerd's major version from what `containerd --version` says."""
    match = re.search(r"\sv?(\d+)\.(\d+)\.\d+", version_output)
    if match is None:
        raise InstallError(f"cannot tell containerd's version from {version_output.strip()[:200]!r}")
    return int(match.group(1))


def version_for_containerd(major: int) -> int:
    """The config version a new main file gets: 3 for containerd 2.x, 2 for 1.7."""
    return 3 if major >= 2 else 2


@dataclasses.dataclass(frozen=True, slots=True)
class Runtime:
    """What our runtime's tables say."""

    name: str
    install_dir: str
    store: str
    store_key: str
    systemd_cgroup: bool
    s3_config: str = ""


def runtime_tables(version: int, runtime: Runtime) -> str:
    """Our runtime's tables for config `version`."""
    table = f"{RUNTIMES_TABLE[version]}.{runtime.name}"
    current = os.path.join(runtime.install_dir, "current", "bin")
    q = toml_text.toml_string
    lines = [
        f"[{table}]",
        f'  runtime_type = "{SHIM_TYPE}"',
        f"  runtime_path = {q(os.path.join(current, 'containerd-shim-hotrestart-v2'))}",
        f"  pod_annotations = [{', '.join(q(a) for a in POD_ANNOTATIONS)}]",
        f"  [{table}.options]",
        '    BinaryName = "runc"',
        f"    SystemdCgroup = {'true' if runtime.systemd_cgroup else 'false'}",
        f"    CheckpointStore = {q(runtime.store)}",
    ]
    if runtime.store_key:
        lines.append(f"    StoreKeyFile = {q(runtime.store_key)}")
    if runtime.s3_config:
        lines.append(f"    S3ConfigFile = {q(runtime.s3_config)}")
    # No CriuPath: a shim from the bundle runs its own version's CRIU, so that a shim still
    # running an older version after an upgrade (or after the uninstall) keeps a CRIU of its own.
    return "\n".join(lines) + "\n"


def render_dropin(version: int, runtime: Runtime) -> str:
    """The drop-in file registering the runtime (containerd 2.x)."""
    return f"{HEADER}version = {version}\n\n{runtime_tables(version, runtime)}"


def render_block(runtime: Runtime, kept: Mapping[str, Mapping[str, Any]]) -> str:
    """The block for containerd 1.7's main file (config version 2). `kept`: runtimes that
    exist only as containerd's defaults, which a `runtimes` table of the file's own would
    otherwise drop (runc, the default runtime, say): written out with our own."""
    parts = [config_edit.BEGIN]
    for name, table in sorted(kept.items()):
        parts.append(_runtime_from_dump(name, table))
    parts.append(runtime_tables(2, runtime).rstrip("\n"))
    parts.append(config_edit.END)
    return "\n".join(parts) + "\n"


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_text.toml_string(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(toml_text.toml_string(v) for v in value) + "]"
    return None


def _runtime_from_dump(name: str, runtime: Mapping[str, Any]) -> str:
    """A runtime as containerd's dump shows it, its values that are not Go's zero values."""
    table = f"{RUNTIMES_TABLE[2]}.{name}"
    lines = [f"[{table}]"]
    for key, value in sorted(runtime.items()):
        if key == "options" or not value:
            continue
        text = _scalar(value)
        if text is None:
            raise InstallError(f"runtime {name}: cannot write its {key!r} back; add the runtime to the file by hand")
        lines.append(f"  {key} = {text}")
    options = runtime.get("options")
    if isinstance(options, Mapping) and any(options.values()):
        lines.append(f"  [{table}.options]")
        for key, value in sorted(options.items()):
            text = _scalar(value) if value else None
            if text is not None:
                lines.append(f"    {key} = {text}")
    return "\n".join(lines)


def runc_systemd_cgroup(config: Mapping[str, Any]) -> bool | None:
    """SystemdCgroup of the default runc runtime in a main file, when it says: the kubelet's
    cgroup driver has to match it, and so does ours."""
    options = runtime_options(config, "runc")
    value = options.get("SystemdCgroup") if options is not None else None
    return value if isinstance(value, bool) else None


def _table(config: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    for key in keys:
        value = config.get(key)
        config = value if isinstance(value, Mapping) else {}
    return config


def default_runtimes(main: Mapping[str, Any], merged: Mapping[str, Any], ours: str) -> dict[str, Mapping[str, Any]]:
    """The runtimes containerd 1.7 has from its defaults alone, when the main file has no
    `runtimes` table of its own: adding ours would replace them, so they are written too."""
    if "runtimes" in _table(main, "plugins", "io.containerd.grpc.v1.cri", "containerd"):
        return {}
    runtimes = _table(merged, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")
    return {name: table for name, table in runtimes.items() if name != ours and isinstance(table, Mapping)}


def _without(config: Mapping[str, Any], runtime: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "imports":
            continue  # it lists the files read, ours among them
        if isinstance(value, Mapping):
            value = _without(value, runtime)
            if key == "runtimes":
                value.pop(runtime, None)
        out[key] = value
    return out


def differences(before: Mapping[str, Any], after: Mapping[str, Any], runtime: str, path: str = "") -> list[str]:
    """Where containerd's merged configuration changed other than in our runtime (and the
    list of files it read)."""
    if path == "":
        before, after = _without(before, runtime), _without(after, runtime)
    found: list[str] = []
    for key in sorted(set(before) | set(after), key=str):
        where = f"{path}/{key}"
        a, b = before.get(key), after.get(key)
        if isinstance(a, Mapping | None) and isinstance(b, Mapping | None):  # a table missing: an empty one
            found += differences(a or {}, b or {}, runtime, where)
        elif a != b and not (a is None and not b) and not (b is None and not a):  # absent: Go's zero value
            found.append(where)
    return found
