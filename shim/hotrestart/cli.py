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
import time

from hotrestart import __version__
from hotrestart.store import config, keyfile
from hotrestart.store.backend import Backend
from hotrestart.store.config import KEY_ENV
from hotrestart.store.entry import Entry
from hotrestart.store.seal import SealError
from hotrestart.store.store import DEFAULT_ROOT as DEFAULT_STORE


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
    checks += gpu_checks()
    checks.append(
        Check(
            "root",
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else "not root",
            "" if os.geteuid() == 0 else "run as root to check CRIU",
        )
    )
    return checks


def archive_checks(config_path: str = "") -> list[Check]:
    """Whether containerd may have this shim restore CRI checkpoint archives, per runtime."""
    from hotrestart import node_config

    if shutil.which("containerd") is None:
        return []
    try:
        runtimes = node_config.hotrestart_runtimes(node_config.dump(config_path))
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return [Check("archive restore", False, f"containerd's configuration cannot be read: {exc}")]
    if not runtimes:
        return [Check("archive restore", True, f"no runtime of type {node_config.SHIM_TYPE} is configured")]
    checks = []
    for name, opts in sorted(runtimes.items()):
        what = f"archive restore ({name})"
        if not opts.allow_archive_restore:
            checks.append(Check(what, True, "off (the default): CRI checkpoint archives are refused"))
        elif opts.allow_unauthenticated_archives:
            checks.append(
                Check(
                    what,
                    False,
                    "ANY archive restores: whoever may create pods can run code as root on this node",
                    "remove AllowUnauthenticatedArchives from the runtime's options",
                )
            )
        else:
            key = opts.store_key_file or "HOTRESTART_STORE_KEY in containerd's environment"
            checks.append(Check(what, True, f"on, archives attested with the store key only ({key})"))
    return checks


def gpu_checks() -> list[Check]:
    """The node's GPU situation: driver, cuda-checkpoint, CRIU's CUDA plugin, who owns GPU state."""
    from hotrestart.gpu import plan
    from hotrestart.gpu.inventory import node_inventory
    from hotrestart.runtime.cuda_checkpoint import find_binary

    inventory = node_inventory()
    driver = inventory.driver if inventory else ""
    if not driver and os.path.exists("/proc/driver/nvidia/version"):
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module\s+(\d+\.\d+(?:\.\d+)?)", f.read())
            driver = match.group(1) if match else "unknown"
    checks: list[Check] = []
    if not driver:
        checks.append(Check("nvidia driver", True, "none (GPU containers are not expected on this node)"))
    else:
        models = ", ".join(sorted({d.name for d in inventory.devices})) if inventory else "NVML unavailable"
        count = len(inventory.devices) if inventory else 0
        ok = _version_tuple(driver) >= (550,)
        detail = f"{driver}; {count} GPU(s): {models}" + (
            "" if _version_tuple(driver) >= (570,) else " (570+ recommended)"
        )
        checks.append(Check("nvidia driver", ok, detail, "" if ok else "cuda-checkpoint needs driver r550+ (r570+)"))
    tool = find_binary()
    if tool:
        _code, out = _run([tool, "--help"])
        actions = "--action" in out
        checks.append(
            Check(
                "cuda-checkpoint",
                actions,
                tool + ("" if actions else " (no --action: older than r555)"),
                "" if actions else "install cuda-checkpoint from driver r555+",
            )
        )
    else:
        checks.append(
            Check(
                "cuda-checkpoint",
                not driver,
                "not found (PATH, or HOTRESTART_CUDA_CHECKPOINT)",
                "install NVIDIA's cuda-checkpoint on PATH" if driver else "",
            )
        )
    criu = shutil.which("criu") or ""
    plugin = plan.find_cuda_plugin(criu)
    checks.append(Check("criu cuda plugin", True, plugin or "not installed"))
    if plugin and driver:
        owner = "CRIU's CUDA plugin (the shim leaves GPU state to it)"
    elif tool:
        owner = "the shim, through cuda-checkpoint"
    else:
        owner = "nobody: containers using a GPU stop and start cold"
    checks.append(Check("GPU state owner", bool(tool or (plugin and driver)) or not driver, owner))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    failed = 0
    for check in doctor_checks() + archive_checks(args.containerd_config):
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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def _store(args: argparse.Namespace) -> Backend:
    # No key required, unlike the shim: an administrator may list and prune a shared store
    # without one (sealed checkpoints are then listed as unsupported).
    try:
        key_file = getattr(args, "store_key", "")
        keys = keyfile.load(key_file) if key_file else None
    except SealError as exc:
        raise SystemExit(f"hotrestart: {exc}") from None
    return config.backend(args.store, keys)


def _state(e: Entry) -> str:
    return e.state.rstrip("s") if e.state == "checkpoints" else e.state


def _report_problems(store: Backend) -> None:
    for problem in store.problems():
        print(f"store: {problem}", file=sys.stderr)


def cmd_ls(args: argparse.Namespace) -> int:
    now = time.time()
    store = _store(args)
    rows = [("ID", "STATE", "IDENTITY", "NODE", "AGE", "SIZE", "REASON")]
    bad: list[Entry] = []
    pools: dict[str, int] = {}
    # A pool's members (one per stopped replica) are listed together.
    for e in sorted(store.entries(), key=lambda e: (e.manifest.identity.canonical() if e.manifest else "~", e.id)):
        if e.state == "staging" and not args.all:
            continue
        m = e.manifest
        if e.fault is not None:
            bad.append(e)
        if m is not None and m.identity.pool and e.state == "checkpoints":
            pools[m.identity.canonical()] = pools.get(m.identity.canonical(), 0) + 1
        rows.append(
            (
                e.id,
                _state(e),
                (m.identity.canonical() + (" (pool)" if m.identity.pool else "")) if m else "?",
                m.node if m else "?",
                _age(now - m.created_at) if m else "?",
                _size(store.size(e)),
                m.reason if m else (e.fault.value if e.fault else "no manifest"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for name, count in sorted(pools.items()):
        print(f"pool {name}: {count} checkpoint(s) waiting for a replica")
    # The reasons go after the table: one bad entry is reported, never a failed listing.
    for e in bad:
        print(f"{e.id} ({_state(e)}, {e.fault.value if e.fault else ''}): {e.problem}")
    _report_problems(store)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    entry = store.find(args.id)
    if entry is None:
        print(f"no single checkpoint matches {args.id!r}", file=sys.stderr)
        return 1
    print(f"id:        {entry.id}\nstate:     {entry.state}\npath:      {entry.path}")
    if entry.state == "quarantine":
        reason = store.reason(entry)
        if reason:
            print(f"quarantined: {reason}")
    m = entry.manifest
    if m is None:
        print(f"manifest:  {entry.problem or 'missing or unreadable'}")
        return 1
    print(f"identity:  {m.identity.canonical()}" + (" (a pool: one checkpoint per replica)" if m.identity.pool else ""))
    if m.identity.source:
        print(f"chosen by: {m.identity.source}")
    print(f"node:      {m.node}\nreason:    {m.reason}")
    print(
        f"taken:     {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m.created_at))} "
        f"({_age(time.time() - m.created_at)} ago)"
    )
    print(f"image:     {m.image}\nruntime:   " + ", ".join(f"{k} {v}" for k, v in sorted(m.runtime.items())))
    print(f"network:   {', '.join(m.network.get('addresses') or []) or 'none recorded'} (tcp: {m.tcp})")
    print(
        f"size:      {_size(m.stored_bytes)} stored, {_size(m.raw_bytes)} raw"
        + (f" ({m.stored_bytes / m.raw_bytes:.2f})" if m.raw_bytes else "")
    )
    print("timings:   " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(m.timings.items())))
    if m.gpu.get("processes"):
        models = ", ".join(d["name"] for d in m.gpu.get("devices") or []) or "devices not recorded (no NVML)"
        used = sum(p.get("memory_used", 0) for p in m.gpu["processes"])
        print(
            f"gpu:       {len(m.gpu['processes'])} process(es), {_size(used)} device memory, {models}; "
            f"driver {m.gpu.get('driver') or '?'}; state saved by {m.gpu.get('owner')}"
        )
    if m.restore_attempts:
        print(f"restores that died early: {m.restore_attempts}")
    if args.files:
        for fe in m.files:
            print(f"  {fe.path}  {_size(fe.stored_bytes)}  sha256:{fe.sha256[:16]}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check stored checkpoints as a restore would, without restoring them (every chunk's
    sha256 and size, every frame decompressed, file types), e.g. after trouble with a
    shared store."""
    store = _store(args)
    code = 0
    for cid in args.ids:
        entry = store.find(cid)
        if entry is None or entry.manifest is None:
            why = "no single checkpoint matches" if entry is None else entry.problem or "manifest missing or unreadable"
            print(f"{cid}: {why}")
            code = 1
            continue
        problems = store.verify(entry)
        for problem in problems:
            print(f"{entry.id}: {problem}")
        files = len(entry.manifest.files)
        bad = len(problems)
        print(f"{entry.id}: {'ok' if not bad else 'DAMAGED'} ({max(files - bad, 0)} of {files} files intact)")
        code = code or (1 if bad else 0)
    return code


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    code = 0
    for cid in args.ids:
        entry = store.find(cid)
        if entry is None:
            print(f"no single checkpoint matches {cid!r}", file=sys.stderr)
            code = 1
            continue
        try:
            store.remove(entry)
        except OSError as exc:
            print(f"could not remove {entry.id}: {exc}", file=sys.stderr)
            code = 1
            continue
        print(f"removed {entry.id}")
    return code


def cmd_prune(args: argparse.Namespace) -> int:
    from hotrestart.checkpoint.policy import parse_duration

    max_age = parse_duration(args.max_age) if args.max_age else None
    store = _store(args)
    removed = store.prune(max_age=max_age, max_bytes=_parse_size(args.max_size) if args.max_size else None)
    for e in removed:
        print(f"removed {e.state} {e.id}" + (f" ({e.fault.value}: {e.problem})" if e.fault else ""))
    print(f"{len(removed)} removed")
    kept = [e for e in store.entries() if e.fault is not None]
    for e in kept:
        print(f"kept {e.state} {e.id} ({e.fault.value if e.fault else ''}: {e.problem})")
    _report_problems(store)
    return 0


def _parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", text.lower())
    if not match:
        raise SystemExit(f"invalid size {text!r} (use e.g. 500M, 20G)")
    return int(float(match.group(1)) * units[match.group(2)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hotrestart", description="hot restart for containerd pods")
    parser.add_argument(
        "--store",
        default=os.environ.get("HOTRESTART_STORE", DEFAULT_STORE),
        help="checkpoint store root (default: %(default)s)",
    )
    parser.add_argument(
        "--store-key",
        default=os.environ.get(KEY_ENV, ""),
        help="the store key file, to authenticate and open sealed checkpoints (default: $HOTRESTART_STORE_KEY)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version").set_defaults(fn=cmd_version)
    p = sub.add_parser("doctor", help="check this node for what the shim needs")
    p.add_argument("--containerd-config", default="", help="containerd's configuration file (its default if unset)")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("ls", help="list checkpoints")
    p.add_argument("-a", "--all", action="store_true", help="include checkpoints still being written")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("inspect", help="show one checkpoint (an id or a unique prefix)")
    p.add_argument("id")
    p.add_argument("--files", action="store_true", help="list its files and hashes")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check checkpoints against their manifests without restoring them")
    p.add_argument("ids", nargs="+")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("rm", help="remove checkpoints")
    p.add_argument("ids", nargs="+")
    p.set_defaults(fn=cmd_rm)
    p = sub.add_parser("prune", help="remove abandoned, expired and over-budget checkpoints")
    p.add_argument("--max-age", help="remove checkpoints older than this (e.g. 24h)")
    p.add_argument("--max-size", help="keep the store under this size (e.g. 50G), oldest removed first")
    p.set_defaults(fn=cmd_prune)
    args = parser.parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
