"""`hotrestart`: the node administrator's command (version, doctor, install, the store's checkpoints)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from hotrestart import __version__, doctor
from hotrestart.doctor import gpu_checks as gpu_checks  # where callers have found it
from hotrestart.install import command as install_command
from hotrestart.sizes import parse_size
from hotrestart.store import config, keyfile
from hotrestart.store.backend import Backend
from hotrestart.store.config import KEY_ENV
from hotrestart.store.entry import Entry
from hotrestart.store.seal import SealError
from hotrestart.store.store import DEFAULT_ROOT as DEFAULT_STORE
from hotrestart.store.tree import one_line


def cmd_version(_args: argparse.Namespace) -> int:
    from hotrestart import bundle

    print(f"hotrestart {__version__} (python {platform.python_version()})")
    for line in bundle.describe():
        print(line)
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
    try:
        return config.backend(args.store, keys)
    except ValueError as exc:  # not a store URL this version knows
        raise SystemExit(f"hotrestart: {exc}") from None


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
    chunks = {c.digest for f in m.files for c in f.chunks}
    print(
        f"chunks:    {len(chunks)} in {m.space}: {_size(m.new_bytes)} written by this checkpoint, "
        f"{_size(max(m.stored_bytes - m.new_bytes, 0))} shared with earlier ones"
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
    restored = store.restore_record(entry)
    if restored is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(restored.started_at))
        how = "lazy (memory on demand)" if restored.lazy else "full"
        if restored.lazy:
            how += (
                f", fully resident after {restored.resident_after:.2f}s"
                if restored.resident_after is not None
                else ", not fully resident (yet)"
            )
        print(f"restored:  {how}, on {one_line(restored.node)} at {when}")
    if args.files:
        for fe in m.files:
            print(f"  {fe.path}  {_size(fe.stored_bytes)}  {len(fe.chunks)} chunk(s)  blake3:{fe.digest[:16]}")
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
    chunks, freed = store.collected
    if chunks:
        print(f"{chunks} chunk(s) no checkpoint refers to removed ({_size(freed)})")
    kept = [e for e in store.entries() if e.fault is not None]
    for e in kept:
        print(f"kept {e.state} {e.id} ({e.fault.value if e.fault else ''}: {e.problem})")
    _report_problems(store)
    return 0


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


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
    doctor.register(sub)
    install_command.register(sub)
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
