"""`hotrestart doctor`: whether this node has what the shim needs, and what to fix when not.

It checks what containerd will use: containerd's merged configuration (`containerd config
dump`), the runtimes of this shim's type registered there with their options, the CRIU the
shim will run (the bundle's own when running from one), and each runtime's checkpoint store.
The installer runs it on the host after an install, and labels the node only when it passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

from hotrestart import bundle, node_config
from hotrestart.checkpoint import workarea
from hotrestart.errors import InvalidArgumentError
from hotrestart.runtime import criu
from hotrestart.store import chunkcache, keyfile, locality
from hotrestart.store.chunkcache import ChunkCache
from hotrestart.store.config import ALLOW_UNAUTHENTICATED_ENV, KEY_ENV
from hotrestart.store.seal import SealError
from hotrestart.store.store import DEFAULT_ROOT as DEFAULT_STORE

STORE_ENV = "HOTRESTART_STORE"
MIN_FREE_GIB = 1.0
# The pod annotations the shim reads (checkpoint/policy.py); containerd passes a pod's
# annotation to the shim only when a `pod_annotations` pattern matches its key.
ANNOTATIONS = tuple(
    "hotrestart.io/" + name
    for name in (
        "checkpoint",
        "checkpoint-timeout",
        "checkpoint-interval",
        "tcp",
        "carry-volumes",
        "gpu-lock-timeout",
        "identity",
        "skip-containers",
        "snapshot",
        "snapshot-after",
        "snapshot-marker",
        "snapshot-signal",
        "snapshot-ttl",
        "restore",
        "dump",
    )
)


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
    path = shutil.which(binary) if binary else None
    if path is None:
        return None
    _code, out = _run([path, "--version"])
    match = re.search(pattern, out)
    return path, match.group(1) if match else out.splitlines()[0] if out else "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def bundle_check() -> Check:
    where = bundle.root()
    if where is None:
        return Check("bundle", True, "installed with pip")
    return Check("bundle", True, f"{where} ({bundle.info().get('version') or 'version unknown'})")


def host_checks(containerd: str = "containerd") -> list[Check]:
    """containerd, runc, CRIU, the kernel and its namespaces."""
    checks: list[Check] = []
    found = _version_of(containerd, r"\s(v?\d+\.\d+\.\d+\S*)")
    if found is None:
        checks.append(Check("containerd", False, f"{containerd} not found", "install containerd 1.7 or 2.x"))
    else:
        ok = _version_tuple(found[1]) >= (1, 7)
        checks.append(Check("containerd", ok, f"{found[1]} ({found[0]})", "" if ok else "upgrade to containerd 1.7+"))
    found = _version_of("runc", r"runc version (\S+)")
    if found is None:
        checks.append(Check("runc", False, "not found on PATH", "install runc 1.1+ (1.3 recommended)"))
    else:
        ok = _version_tuple(found[1]) >= (1, 1)
        checks.append(Check("runc", ok, f"{found[1]} ({found[0]})", "" if ok else "upgrade runc to 1.1 or newer"))
    checks += criu_checks()
    kernel = platform.release()
    new_enough = _version_tuple(kernel) >= (5, 4)
    checks.append(Check("kernel", new_enough, kernel, "" if new_enough else "a 5.4+ kernel is recommended"))
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    checks.append(Check("cgroups", True, "v2 (unified)" if v2 else "v1 (legacy/hybrid)"))
    for name, path in (("user namespaces", "/proc/self/ns/user"), ("pid namespaces", "/proc/self/ns/pid")):
        there = os.path.exists(path)
        checks.append(
            Check(
                name, there, "available" if there else "missing", "" if there else "enable the namespace in the kernel"
            )
        )
    return checks


def criu_checks() -> list[Check]:
    """The CRIU the shim runs (the bundle's own in a bundle): its version and `criu check`."""
    found = _version_of(bundle.tool("criu"), r"Version: (\S+)")
    if found is None:
        fix = "install CRIU 4.x (checkpoints need it; pods still run without it)"
        return [Check("criu", False, "not found (bundle or PATH)", fix)]
    ok = _version_tuple(found[1]) >= (3, 16)
    checks = [
        Check("criu version", ok, f"{found[1]} ({found[0]})", "" if ok else "CRIU 3.16+ is required; 4.x recommended")
    ]
    code, out = _run(criu.check_argv(found[0]), timeout=60)
    last = out.splitlines()[-1] if out else ""
    fix = "" if code == 0 else "CRIU cannot checkpoint on this kernel; on Debian 12 use CRIU 4.x"
    checks.append(Check("criu check", code == 0, last or f"exit {code}", fix))
    return checks + memory_checks(found[0])


def memory_checks(binary: str) -> list[Check]:
    """What makes repeated checkpoints cheap here: the kernel's soft-dirty page tracking and
    userfaultfd. Neither is required: without tracking, each dump reads all of the memory
    and the store keeps only the chunks that changed."""
    code, _ = _run(criu.check_argv(binary, "mem_dirty_track"), timeout=30)
    tracking = (
        "soft-dirty pages tracked by the kernel"
        if code == 0
        else "no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY): every dump reads all memory; "
        "only changed chunks are compressed and stored"
    )
    code_uffd, _ = _run(criu.check_argv(binary, "uffd-noncoop"), timeout=30)
    uffd = "available" if code_uffd == 0 else "unavailable (CONFIG_USERFAULTFD, vm.unprivileged_userfaultfd)"
    return [
        Check("memory tracking", True, tracking),
        Check(
            "userfaultfd",
            True,
            f"{uffd}; restores are "
            + ("lazy: memory on demand" if code_uffd == 0 else "full: all memory before the process runs"),
        ),
    ]


def work_check(env: Mapping[str, str] = os.environ) -> Check:
    """Where checkpoint images go when they do not fit the memory budget: a folder on disk,
    unless that folder is itself in memory (a tmpfs /var/lib, a misplaced setting)."""
    places = workarea.Places.from_env(env)
    limit = "while memory is free" if places.memory_limit is None else f"up to {places.memory_limit >> 20} MiB each"
    try:
        kind = locality.filesystem_type(places.disk)
    except SealError:
        kind = "unknown"
    in_memory = kind in ("tmpfs", "ramfs")
    detail = f"images in memory {limit} ({workarea.MEMORY_ENV}), else in {places.disk} ({kind})"
    fix = f"{places.disk} is in memory: set {workarea.DISK_ENV} to a folder on disk" if in_memory else ""
    return Check("work folders", not in_memory, detail, fix)


def read_config(config_path: str, containerd: str) -> tuple[dict[str, Any] | None, Check | None]:
    """containerd's merged configuration, or the failed check saying why there is none."""
    if shutil.which(containerd) is None:
        return None, Check("containerd config", False, f"{containerd} not found: the configuration cannot be read")
    try:
        return node_config.dump(config_path, containerd), None
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return None, Check("containerd config", False, f"cannot be read: {exc}")


def annotations_passed(patterns: tuple[str, ...]) -> bool:
    """Whether containerd passes every annotation the shim reads, under these patterns."""
    return all(any(node_config.path_match(p, key) for p in patterns) for key in ANNOTATIONS)


def runtime_checks(config: Mapping[str, Any]) -> list[Check]:
    """The runtimes of this shim's type: registered, given the shim, passed its annotations,
    on the runc runtime's cgroup driver."""
    try:
        runtimes = node_config.registered(config)
    except InvalidArgumentError as exc:
        return [Check("runtime", False, str(exc), "fix the runtime's options file")]
    if not runtimes:
        return [
            Check(
                "runtime",
                False,
                f"no runtime of type {node_config.SHIM_TYPE} is registered in containerd's configuration",
                "run `hotrestart install`, or add the runtime by hand (runtime-class/containerd-config-*.toml)",
            )
        ]
    runc_options = node_config.runtime_options(config, "runc") or {}
    runc_systemd = runc_options.get("SystemdCgroup")
    checks: list[Check] = []
    for name, runtime in sorted(runtimes.items()):
        checks.append(_shim_check(name, runtime))
        passed = annotations_passed(runtime.pod_annotations)
        checks.append(
            Check(
                f"pod annotations ({name})",
                passed,
                f"pod_annotations = {list(runtime.pod_annotations)}",
                "" if passed else 'set pod_annotations = ["hotrestart.io/*"]: containerd passes the shim no others',
            )
        )
        ours = runtime.options.systemd_cgroup
        detail = "systemd" if ours else "cgroupfs"
        ok = not isinstance(runc_systemd, bool) or runc_systemd == ours
        if isinstance(runc_systemd, bool):
            detail += f" (runc runtime: {'systemd' if runc_systemd else 'cgroupfs'})"
        fix = "" if ok else f"set SystemdCgroup = {str(runc_systemd).lower()} in the options of {name}, as for runc"
        checks.append(Check(f"cgroup driver ({name})", ok, detail, fix))
        checks.append(driver_support(name, ours))
    return checks


def driver_support(
    name: str, systemd_driver: bool, cgroup_root: str = "/sys/fs/cgroup", systemd_dir: str = "/run/systemd/system"
) -> Check:
    """Whether this node's cgroup version, init and the runtime's cgroup driver go together,
    and how far that combination is tested (README, *Node support*)."""
    v2 = os.path.exists(os.path.join(cgroup_root, "cgroup.controllers"))
    systemd_init = os.path.isdir(systemd_dir)
    node = f"cgroup {'v2' if v2 else 'v1'}, {'systemd' if systemd_init else 'no systemd'} as init"
    what = f"cgroup setup ({name})"
    if systemd_driver and not systemd_init:
        return Check(
            what, False, f"{node}, systemd driver", "the systemd driver needs systemd as init: SystemdCgroup = false"
        )
    if systemd_driver:
        tested = "tested (node VM)" if v2 else "not tested on v1"
        return Check(what, True, f"{node}, systemd driver: {tested}")
    if v2 and systemd_init:
        return Check(
            what, True, f"{node}, cgroupfs driver: tested (node VM); kubeadm's default here is the systemd driver"
        )
    return Check(what, True, f"{node}, cgroupfs driver: tested")


def _shim_check(name: str, runtime: node_config.Runtime) -> Check:
    if runtime.runtime_path:
        ok = os.access(runtime.runtime_path, os.X_OK)
        detail = runtime.runtime_path + ("" if ok else " is missing or not executable")
        return Check(f"runtime {name}", ok, detail, "" if ok else "run `hotrestart install` again")
    shim = shutil.which("containerd-shim-hotrestart-v2")
    return Check(
        f"runtime {name}",
        shim is not None,
        f"registered; shim on PATH: {shim}" if shim else "registered, but containerd-shim-hotrestart-v2 is not on PATH",
        "" if shim else "set runtime_path, or put the shim on containerd's PATH",
    )


def _existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def object_store_checks(url: str, key_file: str = "", allow_unauthenticated: bool = False) -> list[Check]:
    """An s3:// store: a URL, credentials that read and write it, and a key (it is shared)."""
    what = f"store {url}"
    try:
        from hotrestart.store.objectstore import ObjectStore

        store = ObjectStore(url)
    except (ValueError, ImportError, OSError) as exc:
        return [Check(what, False, str(exc), "fix CheckpointStore (s3://bucket/prefix)")]
    probe = f"v1/doctor-{socket.gethostname()[:64]}"
    try:
        store.bucket.put(probe, b"")
        store.bucket.delete([probe])
        checks = [Check(what, True, f"reachable and writable (endpoint {_endpoint()})")]
    except OSError as exc:
        fix = "check the AWS_* settings (endpoint, region, credentials) containerd passes the shim"
        checks = [Check(what, False, str(exc), fix)]
    checks.append(_chunk_cache_check(store.cache))
    if key_file:
        checks.append(_key_file_check(key_file))
    else:
        checks.append(
            Check(
                "store key",
                allow_unauthenticated,
                "none, and an object store is shared"
                + (": unauthenticated checkpoints are allowed" if allow_unauthenticated else ""),
                "" if allow_unauthenticated else "set StoreKeyFile (hotrestart install: HOTRESTART_STORE_KEY_SOURCE)",
            )
        )
    return checks


def _chunk_cache_check(cache: ChunkCache | None) -> Check:
    if cache is not None:
        try:
            held = cache.held()
        except OSError as exc:
            return Check("chunk cache", False, f"{cache.root}: {exc}", "check the folder (root-owned, 0700)")
        return Check("chunk cache", True, f"{cache.root}: {held >> 20} MiB held, at most {cache.cap >> 20} MiB")
    try:
        root, cap = chunkcache.configured()
    except ValueError as exc:
        return Check("chunk cache", False, str(exc), f"set {chunkcache.BYTES_ENV} to a number of bytes (0: off)")
    if cap:
        return Check("chunk cache", False, f"{root} cannot be used (see the shim's log)", "check the folder")
    return Check("chunk cache", True, "off: every restore downloads its checkpoint")


def _key_file_check(key_file: str) -> Check:
    try:
        ring = keyfile.load(key_file)
    except SealError as exc:
        return Check("store key", False, str(exc), "fix the key file (see SECURITY.md)")
    return Check("store key", True, f"{key_file} ({len(ring.names)} key(s), {ring.active} seals)")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or "AWS"


def store_checks(
    root: str, key_file: str = "", allow_unauthenticated: bool = False, *, mountinfo: str = "/proc/self/mountinfo"
) -> list[Check]:
    """The checkpoint store at `root`: there or possible, writable, keyed when shared, roomy."""
    what = f"store {root}"
    if root.startswith("s3://"):
        return object_store_checks(root, key_file, allow_unauthenticated)
    if "://" in root:
        return [Check(what, False, "not a directory and not an s3:// URL", "choose another CheckpointStore")]
    there = _existing(root)
    if there != root and not os.path.isdir(there):
        return [Check(what, False, f"cannot be created: {there} is not a folder", "choose another CheckpointStore")]
    if there == root and not os.path.isdir(root):
        return [Check(what, False, "is not a folder", "choose another CheckpointStore")]
    writable = os.access(there, os.W_OK) and not os.statvfs(there).f_flag & os.ST_RDONLY
    state = "exists" if there == root else f"will be created (in {there})"
    fix = "" if writable else "make it writable by root (a read-only mount?), or choose another CheckpointStore"
    checks = [Check(what, writable, f"{state}, {'writable' if writable else 'NOT writable'}", fix)]
    if key_file:
        checks.append(_key_file_check(key_file))
    else:
        try:
            local = locality.node_local(root, mountinfo=mountinfo)
            fstype = locality.filesystem_type(root, mountinfo=mountinfo)
        except SealError as exc:
            checks.append(Check("store key", False, str(exc)))
        else:
            if local:
                checks.append(Check("store key", True, f"none: the store is node-local ({fstype})"))
            else:
                checks.append(
                    Check(
                        "store key",
                        allow_unauthenticated,
                        f"none, and the store is on {fstype}, which other machines can write"
                        + (": unauthenticated checkpoints are allowed" if allow_unauthenticated else ""),
                        ""
                        if allow_unauthenticated
                        else "set StoreKeyFile (hotrestart install: HOTRESTART_STORE_KEY_SOURCE)",
                    )
                )
    vfs = os.statvfs(there)
    free = vfs.f_bavail * vfs.f_frsize / (1 << 30)
    roomy = free >= MIN_FREE_GIB
    checks.append(
        Check("store space", roomy, f"{free:.1f} GiB free", "" if roomy else f"free at least {MIN_FREE_GIB:.0f} GiB")
    )
    return checks


def stores(config: Mapping[str, Any] | None) -> list[tuple[str, str, bool]]:
    """(root, key file, unauthenticated allowed) of each store the shim would open: each
    runtime's, or the default's when no runtime names one."""
    env_key = os.environ.get(KEY_ENV, "")
    env_allow = os.environ.get(ALLOW_UNAUTHENTICATED_ENV, "").strip().lower() in ("1", "true", "yes")
    default = os.environ.get(STORE_ENV) or DEFAULT_STORE
    found: dict[str, tuple[str, str, bool]] = {}
    try:
        runtimes = node_config.registered(config) if config is not None else {}
    except InvalidArgumentError:
        runtimes = {}
    for runtime in runtimes.values():
        opts = runtime.options
        root = opts.checkpoint_store or default
        found.setdefault(
            root, (root, opts.store_key_file or env_key, opts.allow_unauthenticated_checkpoints or env_allow)
        )
    return list(found.values()) or [(default, env_key, env_allow)]


def archive_checks(config: Mapping[str, Any] | None) -> list[Check]:
    """Whether containerd may have this shim restore CRI checkpoint archives, per runtime."""
    if config is None:
        return []
    try:
        runtimes = node_config.hotrestart_runtimes(config)
    except InvalidArgumentError as exc:
        return [Check("archive restore", False, f"containerd's configuration cannot be read: {exc}")]
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
    plugin = plan.find_cuda_plugin(bundle.tool("criu"))
    checks.append(Check("criu cuda plugin", True, plugin or "not installed"))
    if plugin and driver:
        owner = "CRIU's CUDA plugin (the shim leaves GPU state to it)"
    elif tool:
        owner = "the shim, through cuda-checkpoint"
    else:
        owner = "nobody: containers using a GPU stop and start cold"
    checks.append(Check("GPU state owner", bool(tool or (plugin and driver)) or not driver, owner))
    return checks


def preload_check(path: str = "/etc/ld.so.preload") -> Check:
    """Libraries the host's loader forces into every process, the bundle's included: no
    loader option turns this file off, so it is reported (not failed: security agents use it)."""
    try:
        with open(path, "rb") as f:
            listed = f.read(4096).decode(errors="replace").split()
    except OSError:
        return Check("ld.so.preload", True, "none")
    if not listed:
        return Check("ld.so.preload", True, f"{path} is empty")
    return Check("ld.so.preload", True, f"{', '.join(listed)} loaded into the shim and CRIU too, as into every process")


def all_checks(config_path: str = "", containerd: str = "containerd") -> list[Check]:
    checks = [bundle_check(), preload_check(), *host_checks(containerd)]
    config, failed = read_config(config_path, containerd)
    if failed is not None:
        checks.append(failed)
    else:
        assert config is not None
        checks += runtime_checks(config)
    for root, key_file, allow in stores(config):
        checks += store_checks(root, key_file, allow)
    checks += archive_checks(config)
    checks.append(work_check())
    checks += gpu_checks()
    is_root = os.geteuid() == 0
    checks.append(
        Check(
            "root",
            is_root,
            "running as root" if is_root else "not root",
            "" if is_root else "run as root to check CRIU",
        )
    )
    return checks


def report(checks: list[Check]) -> int:
    failed = 0
    for check in checks:
        mark = "ok " if check.ok else "MISSING"
        print(f"[{mark:>7}] {check.name}: {check.detail}")
        if not check.ok:
            failed += 1
            if check.fix:
                print(f"          fix: {check.fix}")
    print("all checks passed" if not failed else f"{failed} check(s) need attention")
    return 1 if failed else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    return report(all_checks(args.containerd_config, args.containerd))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check this node for what the shim needs")
    p.add_argument("--containerd-config", default="", help="containerd's configuration file (its default if unset)")
    p.add_argument("--containerd", default="containerd", help="the containerd binary (default: the one on PATH)")
    p.set_defaults(fn=cmd_doctor)
