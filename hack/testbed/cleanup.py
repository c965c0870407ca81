"""Tearing down what an instance left behind: processes, mounts, cgroups, bridge, CNI cache."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import host
from .layout import MARKER_ENV, NAMESPACE
from .locks import lock_file, net_slot_lock


def cri_teardown(address: Path, known_ids: set[str]) -> list[str]:
    """Stop and remove every pod through the CRI, noting their ids in ``known_ids``."""
    from cri.client import CRIClient

    problems = []
    try:
        with CRIClient(address, timeout=30) as c:
            with contextlib.suppress(Exception):
                known_ids.update(x.id for x in c.list_containers())
                known_ids.update(x.id for x in c.list_pod_sandboxes())
            problems += [f"CRI teardown: {e}" for e in c.remove_all(stop_timeout=1)]
    except Exception as e:
        problems.append(f"CRI teardown failed: {e}")
    return problems


def reap_stale(base: str | Path) -> list[str]:
    """Clean up instance dirs under ``base`` whose owner died; returns them."""
    reaped = []
    for d in sorted(Path(base).glob("hrtb-*")):
        info_file = d / "instance.json"
        if not info_file.is_file():
            continue
        try:
            fd = lock_file(d / ".lock", blocking=False)
        except BlockingIOError:
            continue  # alive
        except OSError:
            continue
        net_lock = None
        try:
            info = json.loads(info_file.read_text())
            # The dead owner's network slot may have gone to a live
            # instance since: only touch the bridge while holding its lock.
            slot = info.get("net_slot")
            if slot is not None:
                with contextlib.suppress(OSError):
                    net_lock = lock_file(net_slot_lock(slot), blocking=False)
            cleanup(info, delete_bridge=net_lock is not None)
        except (OSError, ValueError, KeyError):
            pass
        finally:
            if net_lock is not None:
                os.close(net_lock)
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(str(d))
    return reaped


def instance_processes(dir_: str) -> list[host.Proc]:
    """Live processes naming ``dir_`` or carrying its marker, with all their descendants."""
    procs = host.processes()
    me = os.getpid()
    roots = {
        p.pid
        for p in procs
        if p.pid != me
        and (
            any(a == dir_ or a.startswith(dir_ + "/") for a in p.cmdline) or host.environ(p.pid).get(MARKER_ENV) == dir_
        )
    }
    tree = host.descendants(roots, procs) - {me}
    return [p for p in procs if p.pid in tree]


def _cgroup_members(prefixes: Sequence[str], ids: set[str]) -> set[int]:
    """Pids in a cgroup below one of ``prefixes`` or named after one of ``ids``."""
    pids = set()
    for p in host.processes():
        for _, path in host.cgroups_of(p.pid):
            if any(path == pre or path.startswith(pre + "/") for pre in prefixes) or (os.path.basename(path) in ids):
                pids.add(p.pid)
                break
    return pids


def cleanup(info: Mapping[str, Any], delete_bridge: bool = True) -> list[str]:
    """Kill, unmount and remove what an instance left behind (containerd stopped)."""
    problems: list[str] = []
    dir_ = info["dir"]
    ids = set(info.get("known_ids") or ()) | _task_ids(Path(dir_))
    prefixes = [info["cgroup_parent"]]

    # 1. Processes: anything naming our directory (containerd, shims, runc,
    #    criu) with its descendants (containers), plus whatever sits in our
    #    cgroups (containers that were re-parented away from a dead shim).
    victims = {p.pid for p in instance_processes(dir_)}
    victims |= _cgroup_members(prefixes, ids)
    sockets = {s for s in host.unix_socket_paths(victims) if s.startswith(("/run/containerd/s/", dir_ + "/"))}
    left = host.kill_all(victims)
    if left:
        problems.append(f"processes survived SIGKILL: {sorted(left)}")
    for s in sockets:
        with contextlib.suppress(OSError):
            os.unlink(s)

    # 2. Mounts (rootfs, shm, netns bind mounts under state/netns).
    remaining = host.unmount_all(dir_)
    if remaining:
        problems.append(f"still mounted: {remaining}")

    # 3. cgroups: our parent tree, and /k8s.io/<id> for pods run without one. Under the
    #    systemd driver the tree is systemd's: its units go first (it removes their cgroups).
    if info.get("slice"):
        problems += host.stop_systemd_unit(info["slice"])
    cg = [*prefixes, *(f"/{NAMESPACE}/{i}" for i in ids)]
    busy = host.remove_cgroup_trees(cg)
    if busy:
        problems.append(f"cgroups not removable: {busy[:5]}")

    # 4. Network: our bridge and libcni's cached results for our network.
    if delete_bridge and info.get("bridge"):
        host.delete_link(info["bridge"])
    _remove_cni_cache(info.get("cni_network"), dir_)
    return problems


def _task_ids(dir_: Path) -> set[str]:
    """Ids of the tasks (containers, sandboxes) in an instance's state dir."""
    ids: set[str] = set()
    for ns in (dir_ / "state" / "io.containerd.runtime.v2.task").glob("*"):
        with contextlib.suppress(OSError):
            ids.update(d.name for d in ns.iterdir())
    return ids


def _remove_cni_cache(network: str | None, dir_: str) -> None:
    """libcni keeps results in /var/lib/cni/results until CNI DEL; drop ours:
    those of our network and the CRI's loopback ones for our netns files."""
    for cache in Path("/var/lib/cni/results").glob("*"):
        try:
            if network and cache.name.startswith(network + "-"):
                cache.unlink()
                continue
            netns = json.loads(cache.read_text()).get("netns", "")
            if isinstance(netns, str) and netns.startswith(dir_ + "/"):
                cache.unlink()
        except (OSError, ValueError, AttributeError):
            pass
