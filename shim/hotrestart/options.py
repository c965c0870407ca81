"""Runtime options from containerd: the `options` table of the runtime's CRI config.

For a runtime_type other than runc, containerd sends `runtimeoptions.v1.Options`, whose
`config_body` (1.7+) is the options table as TOML and whose `config_path` names a TOML file.
runc's own `containerd.runc.v1.Options` is accepted too, for `runtime_path` set-ups that
register the shim under the runc type. Keys follow runc-v2's option names.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from hotrestart.api.containerd.runc.v1 import oci_pb2
from hotrestart.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from hotrestart.errors import InvalidArgumentError
from hotrestart.runtime.runc import DEFAULT_ROOT

log = logging.getLogger(__name__)

RUNC_OPTIONS = "containerd.runc.v1.Options"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeOptions:
    binary_name: str = "runc"
    root: str = DEFAULT_ROOT
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    criu_path: str = ""
    # Hot restart: where checkpoints live (node-local by default, or a shared mount).
    checkpoint_store: str = ""
    # The store key (see SECURITY.md): authenticates and encrypts checkpoints. A store that is
    # not node-local is refused without one unless unauthenticated checkpoints are allowed.
    store_key_file: str = ""
    allow_unauthenticated_checkpoints: bool = False
    # An s3:// store's endpoint, region and credentials, as an AWS config file (the
    # installer copies it from a Secret); unset, the AWS environment and files decide.
    s3_config_file: str = ""
    # Restore from CRI checkpoint archives (containerd 2.1-2.3's restore through create): off
    # by default; when on, only archives this shim attested with the store key, unless
    # unauthenticated ones are allowed too (which gives whoever may create pods root).
    allow_archive_restore: bool = False
    allow_unauthenticated_archives: bool = False


_TOML_KEYS = {
    "BinaryName": "binary_name",
    "Root": "root",
    "SystemdCgroup": "systemd_cgroup",
    "NoPivotRoot": "no_pivot_root",
    "NoNewKeyring": "no_new_keyring",
    "CriuPath": "criu_path",
    "CheckpointStore": "checkpoint_store",
    "StoreKeyFile": "store_key_file",
    "AllowUnauthenticatedCheckpoints": "allow_unauthenticated_checkpoints",
    "S3ConfigFile": "s3_config_file",
    "AllowArchiveRestore": "allow_archive_restore",
    "AllowUnauthenticatedArchives": "allow_unauthenticated_archives",
}


def _type_name(any_msg: any_pb2.Any) -> str:
    return str(any_msg.type_url).rsplit("/", 1)[-1]


def decode(any_msg: any_pb2.Any | None) -> RuntimeOptions:
    if any_msg is None or not any_msg.type_url:
        return RuntimeOptions()
    name = _type_name(any_msg)
    try:
        if name == RUNC_OPTIONS:
            runc = oci_pb2.Options.FromString(any_msg.value)
            return RuntimeOptions(
                binary_name=runc.binary_name or "runc",
                root=runc.root or DEFAULT_ROOT,
                systemd_cgroup=runc.systemd_cgroup,
                no_pivot_root=runc.no_pivot_root,
                no_new_keyring=runc.no_new_keyring,
                criu_path=runc.criu_path,
            )
        if name == RUNTIME_OPTIONS:
            ro = runtimeoptions_pb2.Options.FromString(any_msg.value)
            table: dict[str, Any] = {}
            if ro.config_path:
                try:
                    with open(ro.config_path, "rb") as f:
                        table.update(tomllib.load(f))
                except FileNotFoundError:
                    log.info("runtime config %s does not exist; using defaults", ro.config_path)
            if ro.config_body:
                table.update(tomllib.loads(ro.config_body.decode()))
            return from_table(table)
    except (DecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"invalid runtime options {name}: {exc}") from exc
    log.warning("ignoring runtime options of unknown type %s", name)
    return RuntimeOptions()


def from_table(table: dict[str, Any]) -> RuntimeOptions:
    values: dict[str, Any] = {}
    for key, field in _TOML_KEYS.items():
        if key in table:
            values[field] = table[key]
    try:
        return RuntimeOptions(**values)
    except TypeError as exc:
        raise InvalidArgumentError(f"invalid runtime options: {exc}") from exc
