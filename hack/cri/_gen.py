"""Generate the Python bindings of the CRI (runtime.v1) from the test bed's api.proto.

The proto comes from Debian's golang-github-kubernetes-cri-api-dev and is kept
by hack/install-testbed.sh at $HOTRESTART_TESTBED/cri/api.proto.  The modules
are written to hack/cri/gen/ (not tracked by git) and rebuilt whenever
the proto, grpcio-tools or protobuf change.  Several processes (pytest-xdist
workers) may call ensure_generated() at once: an exclusive flock serialises
them and files are moved into place atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

TESTBED = Path(os.environ.get("HOTRESTART_TESTBED", "/opt/hotrestart-testbed"))
DEFAULT_PROTO = TESTBED / "cri" / "api.proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"
# The proto is compiled under this file name, which is also its name in
# protobuf's default descriptor pool: a plain "api.proto" could clash with
# other generated code loaded in the same process.
PROTO_NAME = "cri_runtime_v1"
_OUTPUTS = (f"{PROTO_NAME}_pb2.py", f"{PROTO_NAME}_pb2_grpc.py", "__init__.py")

_GOGO_IMPORT = re.compile(r'^\s*import\s+"[^"]*gogo\.proto"\s*;\s*$', re.M)
_GOGO_OPTION = re.compile(r"^\s*option\s+\(gogoproto\.[^;]*;\s*$", re.M)
# Field options such as [(gogoproto.nullable) = false, json_name = "x"].
_GOGO_FIELD_OPT = re.compile(r"\(gogoproto\.[A-Za-z_]+\)\s*=\s*[^,\]]+,?\s*")
_EMPTY_FIELD_OPTS = re.compile(r"\s*\[\s*\]")


def strip_gogo(text: str) -> str:
    """Remove gogoproto imports and options (they only matter to Go)."""
    text = _GOGO_IMPORT.sub("", text)
    text = _GOGO_OPTION.sub("", text)
    text = _GOGO_FIELD_OPT.sub("", text)
    text = _EMPTY_FIELD_OPTS.sub("", text)
    return text


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _fingerprint(proto_text: bytes) -> dict[str, str]:
    return {
        "module": PROTO_NAME,
        "proto_sha256": hashlib.sha256(proto_text).hexdigest(),
        "grpcio-tools": _version("grpcio-tools"),
        "protobuf": _version("protobuf"),
    }


def _current(stamp: Path, want: dict[str, str]) -> bool:
    if not all((GEN_DIR / name).is_file() for name in _OUTPUTS):
        return False
    try:
        return bool(json.loads(stamp.read_text()) == want)
    except (OSError, ValueError):
        return False


def ensure_generated(proto: Path = DEFAULT_PROTO) -> Path:
    """Make sure hack/cri/gen/ is up to date with ``proto``; return GEN_DIR."""
    if not proto.is_file():
        raise FileNotFoundError(f"{proto} is missing: run `sudo bash hack/install-testbed.sh` first")
    text = proto.read_bytes()
    want = _fingerprint(text)
    stamp = GEN_DIR / ".stamp.json"
    if _current(stamp, want):
        return GEN_DIR

    GEN_DIR.mkdir(parents=True, exist_ok=True)
    with open(GEN_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(stamp, want):  # somebody else did it meanwhile
            return GEN_DIR
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=GEN_DIR))
        try:
            (tmp / f"{PROTO_NAME}.proto").write_text(strip_gogo(text.decode()))
            import grpc_tools

            wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"-I{tmp}",
                    f"-I{wkt}",
                    f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(tmp / f"{PROTO_NAME}.proto"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"grpc_tools.protoc failed on {proto}:\n{proc.stderr}")
            grpc_mod = tmp / f"{PROTO_NAME}_pb2_grpc.py"
            # protoc writes an absolute import; the modules live in a package.
            grpc_mod.write_text(
                re.sub(
                    rf"^import {PROTO_NAME}_pb2 as ",
                    f"from . import {PROTO_NAME}_pb2 as ",
                    grpc_mod.read_text(),
                    flags=re.M,
                )
            )
            (tmp / "__init__.py").write_text(f"# Generated from {proto} by hack/cri/_gen.py; do not edit.\n")
            for name in _OUTPUTS:
                os.replace(tmp / name, GEN_DIR / name)
            stamp_tmp = tmp / "stamp"
            stamp_tmp.write_text(json.dumps(want, sort_keys=True))
            os.replace(stamp_tmp, stamp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return GEN_DIR
