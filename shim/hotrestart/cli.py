"""`hotrestart`: the node administrator's command (version, doctor)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shutil
import subprocess
import sys

from hotrestart import __version__


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _run(argv: list[str], timeout: float = 30) -> tuple[int, str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return result.returncode, (result.stdout + result.stderr).strip()


def _version_of(binary: str, pattern: str) -> tuple[str, str] | None:
    path = shutil.which(binary)
    if path is None:
        return None
    _code, out = _run([path, "--version"])
    match = re.search(pattern, out)
    return path, match.group(1) if match else out.splitlines()[0] if out else "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def doctor_checks() -> list[Check]:
    checks: list[Check] = []
    found = _version_of("containerd", r"\s(v?\d+\.\d+\.\d+\S*)")
    if found is None:
        checks.append(Check("containerd", False, "not found on PATH", "install containerd 1.7 or 2.x"))
    else:
        ok = _version_tuple(found[1]) >= (1, 7)
        checks.append(Check("containerd", ok, f"{found[1]} ({found[0]})", "" if ok else "upgrade to containerd 1.7+"))
    found = _version_of("runc", r"runc version (\S+)")
    if found is None:
        checks.append(Check("runc", False, "not found on PATH", "install runc 1.1+ (1.3 recommended)"))
    else:
        ok = _version_tuple(found[1]) >= (1, 1)
        checks.append(Check("runc", ok, f"{found[1]} ({found[0]})", "" if ok else "upgrade runc to 1.1 or newer"))
    found = _version_of("criu", r"Version: (\S+)")
    if found is None:
        checks.append(
            Check(
                "criu", False, "not found on PATH", "install CRIU 4.x (checkpoints need it; pods still run without it)"
            )
        )
    else:
        ok = _version_tuple(found[1]) >= (3, 16)
        checks.append(
            Check(
                "criu version", ok, f"{found[1]} ({found[0]})", "" if ok else "CRIU 3.16+ is required; 4.x recommended"
            )
        )
        code, out = _run([found[0], "check"], timeout=60)
        last = out.splitlines()[-1] if out else ""
        checks.append(
            Check(
                "criu check",
                code == 0,
                last or f"exit {code}",
                "" if code == 0 else "CRIU cannot checkpoint on this kernel; on Debian 12 use CRIU 4.x",
            )
        )
    kernel = platform.release()
    checks.append(
        Check(
            "kernel",
            _version_tuple(kernel) >= (5, 4),
            kernel,
            "" if _version_tuple(kernel) >= (5, 4) else "a 5.4+ kernel is recommended",
        )
    )
    cg2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    checks.append(Check("cgroups", True, "v2 (unified)" if cg2 else "v1 (legacy/hybrid)"))
    for name, path in (("user namespaces", "/proc/self/ns/user"), ("pid namespaces", "/proc/self/ns/pid")):
        checks.append(
            Check(
                name,
                os.path.exists(path),
                "available" if os.path.exists(path) else "missing",
                "" if os.path.exists(path) else "enable the namespace in the kernel",
            )
        )
    shim = shutil.which("containerd-shim-hotrestart-v2")
    checks.append(
        Check(
            "shim on PATH",
            shim is not None,
            shim or "containerd-shim-hotrestart-v2 not found",
            "" if shim else "pip install hotrestart into a PATH containerd searches",
        )
    )
    checks.append(
        Check(
            "root",
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else "not root",
            "" if os.geteuid() == 0 else "run as root to check CRIU",
        )
    )
    return checks


def cmd_doctor(_args: argparse.Namespace) -> int:
    failed = 0
    for check in doctor_checks():
        mark = "ok " if check.ok else "MISSING"
        print(f"[{mark:>7}] {check.name}: {check.detail}")
        if not check.ok:
            failed += 1
            if check.fix:
                print(f"          fix: {check.fix}")
    print("all checks passed" if not failed else f"{failed} check(s) need attention")
    return 1 if failed else 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"hotrestart {__version__} (python {platform.python_version()})")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hotrestart", description="hot restart for containerd pods")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version").set_defaults(fn=cmd_version)
    sub.add_parser("doctor", help="check this node for what the shim needs").set_defaults(fn=cmd_doctor)
    args = parser.parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
