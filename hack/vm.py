#!/usr/bin/env python3
"""The test bed's node VM: cgroup v2 only, systemd as init (hack/vm/build-image.sh).

    python hack/vm.py build                    build the image (once; cached)
    python hack/vm.py run -- CMD...            boot, run CMD as root, power off; CMD's status
    python hack/vm.py test [--driver D] [--full] [--shard K/N] [--resume --out DIR] [-- PYTEST ARGS]
                                               the end-to-end tests in the VM, with containerd's
                                               cgroup driver D (systemd, the kubeadm default, or
                                               cgroupfs): the smoke subset, --full every
                                               integration and end-to-end test, or those named;
                                               --shard: the K-th of N parts of them;
                                               --resume: only what has not yet passed in DIR's
                                               earlier sittings on the same code

The machine shares this checkout, its virtual environment's Python and the test bed's
sysroot with the host, read-only and at the same paths (9p), so it runs exactly what the
host's suite runs; everything it writes stays in a throwaway overlay of the image (qemu
-snapshot) except the output share. The host reads the serial console and the output share:
nothing listens on a network.

KVM is used where it works. Where /dev/kvm exists but cannot run a guest (nested
virtualization that starts vCPUs and then never runs the kernel, as on Firecracker VMs),
the probe below says so and the machine runs under software emulation (TCG), several
times slower.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed import shard

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The image's recipe version, as build-image.sh states it (a new one builds a new image).
RECIPE = next(
    line.split("=", 1)[1].strip()
    for line in (HERE / "vm" / "build-image.sh").read_text().splitlines()
    if line.startswith("RECIPE=")
)
CACHE = Path(os.environ.get("HOTRESTART_VM_CACHE", f"/var/cache/hotrestart-vm/r{RECIPE}"))
TESTBED = Path(os.environ.get("HOTRESTART_TESTBED", "/opt/hotrestart-testbed"))
KVM_VERDICT = Path("/run/hotrestart-vm-kvm")  # the probe's answer, once per host boot
MEMORY_MIB = int(os.environ.get("HOTRESTART_VM_MEMORY_MIB", "6144"))
BOOT_ALLOWANCE = 300.0  # seconds for boot and power-off on top of the command's own limit
# What CI runs in the VM (`make test-vm-smoke`), sized to fit CI's limit under emulation (each
# end-to-end test takes one to two minutes there): on every node shape, a pod's start, stats
# and resource updates, an OOM kill, hot restart, and a periodic checkpoint then an OOM kill,
# each on containerd 2.1, the runtime and the reference side by side where the test compares.
SMOKE = [
    "tests/e2e/test_differential.py::test_stats_and_resource_update[containerd2]",
    "tests/e2e/test_differential.py::test_oom_kill_reported[containerd2]",
    "tests/e2e/test_hot_restart.py::test_stop_and_create_again_continues[containerd2]",
    "tests/e2e/test_checkpoint_api.py::test_periodic_checkpoint_restores_after_an_oom_kill[containerd2]",
]
# On the kubeadm default alone (cgroup v2, the systemd driver): the vfork-safe freeze on
# cgroup.freeze, pause/resume, and last (it sets the machine's own containerd up as a kubeadm
# node) the installer's DaemonSet. Only what depends on the node's cgroups: the rest of the
# shim's behaviour is the host's suite, and CI's time limit holds three emulated machines.
# `make test-vm` runs everything, on both drivers.
SMOKE_DEFAULT_NODE = [
    "tests/integration/test_cgroups.py",
    "tests/e2e/test_differential.py::test_pause_resume[containerd2]",
    "tests/e2e/test_node_install.py",
]
# `make test-vm`: everything the host's suite runs that a node runs (not the unit tier, not
# the VM's own test).
FULL_INTEGRATION = [
    "tests/integration",
    # The machine has no network: the test bed's Ceph cannot be installed there.
    "--ignore=tests/integration/test_object_store.py",
]
FULL_E2E = [
    "tests/e2e",
    # Nor can an older Debian be debootstrapped there for the bundle's glibc check.
    "--ignore=tests/e2e/test_object_store.py",
    "--deselect=tests/e2e/test_bundle.py::test_bundle_runs_on_an_older_glibc_without_python",
    # A 4 GiB container in a 6 GiB machine: its memory and the dump's work folder do not fit
    # (the host's run keeps it).
    "--deselect=tests/e2e/test_scale.py::test_a_4gib_container_checkpointed_periodically_then_stopped_writes_what_changed_and_continues",
]
FULL = [*FULL_INTEGRATION, *FULL_E2E]
# The integration tier drives runc through the shim without containerd, so containerd's cgroup
# driver does not reach it: on a node shape the systemd driver's run has covered, the
# cgroupfs driver's runs the end-to-end tier alone.
FULL_CGROUPFS = FULL_E2E
# Under emulation only: a shim waits 5 s for the node's zygote to come up, and a Python
# process takes longer than that to start there, so shims start without it (by design).
TCG_DESELECT = ["tests/integration/test_shim_runc.py::test_shims_fork_from_one_zygote"]
# How much slower than a real node a machine under emulation is, for the tests' grace periods.
TCG_TIME_SCALE = "4"
# Each test phase's limit in the machine (pytest-timeout), and the time kept after pytest's own
# deadline for its teardown and the logs' collection before the machine's limit kills the run.
TEST_TIMEOUT = 900
PYTEST_MARGIN = 240.0


def log(msg: str) -> None:
    print(f"==> [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(force: bool = False) -> None:
    cmd = ["bash", str(HERE / "vm" / "build-image.sh"), *(["--force"] if force else [])]
    subprocess.run(cmd, check=True, env={**os.environ, "HOTRESTART_VM_CACHE": str(CACHE)})


def _qemu_base(accel: str) -> list[str]:
    cpu = "host,-arch-capabilities" if accel == "kvm" else "max"
    return [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        str(min(os.cpu_count() or 1, 4)),
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(CACHE / "vmlinuz"),
        "-initrd",
        str(CACHE / "initrd.img"),
    ]


def ensure_built() -> None:
    """The image and kernel, and qemu itself (build-image.sh installs it on a fresh machine)."""
    if not (CACHE / ".built").exists():
        build()


def accelerator() -> str:
    """'kvm' when a guest kernel gets as far as its panic under KVM within 30 s, else 'tcg'."""
    if KVM_VERDICT.exists():
        return KVM_VERDICT.read_text().strip()
    ensure_built()  # the probe boots the image's kernel with qemu
    verdict = "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        cmd = [*_qemu_base("kvm"), "-m", "512", "-append", "console=ttyS0 panic=-1 rdinit=/hotrestart-no-init"]
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=30).stdout
            verdict = "kvm" if b"Kernel panic" in out else "tcg"
        except subprocess.TimeoutExpired:
            pass
        log(f"KVM {'runs a guest' if verdict == 'kvm' else 'does not run a guest here'}: using {verdict}")
    KVM_VERDICT.write_text(verdict + "\n")
    return verdict


def _shares() -> list[Path]:
    """What the machine sees at the host's paths: the checkout, the Python its virtual
    environment was made from, the test bed."""
    python_home = Path(os.path.realpath(REPO / ".venv" / "bin" / "python")).parents[1]
    # A venv of the system's Python needs nothing shared: the image has the same Debian Python
    # (and mounting the host's /usr over the machine's would replace the whole system).
    found = [REPO, TESTBED] if python_home == Path("/usr") else [REPO, python_home, TESTBED]
    return [p for p in found if p.is_dir()]


# The node shapes: the unified hierarchy only with no v1 controller anywhere (what current
# distributions boot), or systemd's hybrid layout (v1 controllers, systemd's own tree on v2).
CGROUP_CMDLINE = {
    "v2": ["systemd.unified_cgroup_hierarchy=1", "cgroup_no_v1=all"],
    "v1": ["systemd.unified_cgroup_hierarchy=0"],
}


def run(command: str, timeout: float, out: Path, files: dict[str, Path] | None = None, cgroup: str = "v2") -> int:
    """Boot the machine, run `command` (bash) as root there, power off; its exit status
    (124 when it ran past `timeout`, 125 when the machine never reported)."""
    ensure_built()
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.sh").write_text(command + "\n")
    (out / "timeout").write_text(f"{int(timeout)}\n")
    for name, src in (files or {}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / name)
    (out / "rc").unlink(missing_ok=True)
    accel = accelerator()
    args = [*_qemu_base(accel), "-m", str(MEMORY_MIB), "-snapshot"]
    args += ["-drive", f"file={CACHE / 'rootfs.img'},if=virtio,format=raw"]
    cmdline = [
        "root=/dev/vda",
        "rw",
        "console=ttyS0",
        "panic=-1",
        *CGROUP_CMDLINE[cgroup],
        "systemd.show_status=0",
    ]
    for i, path in enumerate(_shares()):
        tag = f"s{i}"
        args += ["-fsdev", f"local,id={tag},path={path},security_model=passthrough,readonly=on"]
        args += ["-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
        cmdline.append(f"hotrestart.share={tag}:{path}")
    args += ["-fsdev", f"local,id=out,path={out},security_model=passthrough"]
    args += ["-device", "virtio-9p-pci,fsdev=out,mount_tag=out"]
    cmdline.append("hotrestart.out=out")
    args += ["-append", " ".join(cmdline)]
    console = out / "console.log"
    log(f"booting the VM ({accel}, {MEMORY_MIB} MiB); console in {console}")
    t0 = time.monotonic()
    with open(console, "wb") as sink:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout + BOOT_ALLOWANCE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log("the VM did not power off in time; killed")
    took = time.monotonic() - t0
    if not (out / "rc").exists():
        tail = console.read_bytes()[-3000:].decode(errors="replace")
        log(f"the VM never reported an exit status after {took:.0f}s; console tail:\n{tail}")
        return 125
    rc = int((out / "rc").read_text().strip() or "125")
    rc = 124 if rc == 137 else rc  # timeout --signal=KILL
    log(f"the VM ran the command: exit {rc} after {took:.0f}s")
    return rc


def memhog(dst: Path) -> Path:
    """hack/memhog.c built static here: the VM has no compiler."""
    binary = dst / "memhog"
    subprocess.run(
        ["gcc", "-static", "-O2", "-pthread", "-o", str(binary), str(HERE / "memhog.c")],
        check=True,
    )
    return binary


# A test's outcome as `pytest -v` prints it when the test ends (its teardown's error follows).
_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|SKIPPED|XFAIL|XPASS|FAILED|ERROR)\b", re.MULTILINE)


def outcomes(output: str) -> tuple[set[str], set[str]]:
    """(the tests an output.log shows passed or skipped, those it shows failed or in error).
    When any test's teardown failed after it passed, none counts as passed: a session
    fixture's teardown (containerd's leak check) reports on every test before it, but prints
    its error under the last one."""
    good, bad = set(), set()
    for test_id, outcome in _OUTCOME.findall(output):
        (bad if outcome in ("FAILED", "ERROR") else good).add(test_id)
    return (set() if good & bad else good - bad), bad


def code_key() -> str:
    """What the machine runs: every tracked file but the docs, as HEAD has them; '' when the
    checkout differs from HEAD beyond the docs (an edit, or a file git does not track or
    ignore): then no sitting counts."""
    git = ["git", "-C", str(REPO)]
    changed = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    tree = subprocess.run([*git, "ls-tree", "-r", "HEAD"], capture_output=True, text=True)
    if changed.returncode or tree.returncode or any(not x.endswith(".md") for x in changed.stdout.splitlines()):
        return ""
    code = [line for line in tree.stdout.splitlines() if not line.endswith(".md")]
    return hashlib.sha256("\n".join(code).encode()).hexdigest()


def node_key(driver: str, cgroup: str, emulated: bool, selected: list[str]) -> str:
    """The code, the node and the selection a sitting ran; '' as for `code_key`."""
    code = code_key()
    return hashlib.sha256(json.dumps([code, driver, cgroup, emulated, selected]).encode()).hexdigest() if code else ""


class Sittings:
    """A run that may take several sittings (`--resume`): under emulation the whole tiers take
    hours, longer than some machines are held. The out folder keeps what passed on which
    code; a sitting runs only the rest (testbed.passed_earlier leaves out what `passed-earlier.txt`
    lists), and only on the same code, node and selection."""

    def __init__(self, out: Path, key: str) -> None:
        self.path = out / "sittings.json"
        self.key = key
        try:
            state = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError:
            state = {}
        same = bool(key) and state.get("key") == key
        self.done: set[str] = set(state.get("done", [])) if same else set()
        self.sittings: list[dict[str, object]] = list(state.get("sittings", [])) if same else []
        # A sitting cut off before it could record itself still left its line per test.
        written_by, output = out / "output.key", out / "output.log"
        if same and output.exists() and written_by.exists() and written_by.read_text().strip() == key:
            passed, failed = outcomes(output.read_text(errors="replace"))
            self.done |= passed
            if self.sittings and "rc" not in self.sittings[-1]:
                self.sittings[-1].update(passed=len(passed), failed=sorted(failed), rc="cut off")
        if same:  # this sitting writes over the last one's output and logs: keep them
            for name, kept in (("output.log", "output.sitting{}.log"), ("logs.tgz", "logs.sitting{}.tgz")):
                if (out / name).exists():
                    (out / name).rename(out / kept.format(len(self.sittings)))
        self.sittings.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self._save()
        written_by.write_text(key + "\n")  # what this sitting's output.log will be
        (out / "passed-earlier.txt").write_text("".join(f"{t}\n" for t in sorted(self.done)))

    def record(self, output: str, rc: int, took: float, key_now: str) -> None:
        """What the sitting's output shows; nothing counts if the code changed meanwhile
        (the machine reads the checkout as it is)."""
        passed, failed = outcomes(output)
        entry = self.sittings[-1]
        if key_now != self.key:
            passed, entry["discarded"] = set(), "the checkout changed during the sitting"
        self.done |= passed
        entry.update(passed=len(passed), failed=sorted(failed), rc=rc, seconds=round(took))
        self._save()

    def _save(self) -> None:
        if not self.key:
            return
        state = {"key": self.key, "done": sorted(self.done), "sittings": self.sittings}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.path)


def test(
    driver: str,
    pytest_args: list[str],
    timeout: float,
    out: Path,
    cgroup: str = "v2",
    resume: bool = False,
    shard: str | None = None,
) -> int:
    shared_out = "/run/hotrestart-vm-out"
    # The checkout is read-only in the machine: the CRI client's stubs, which the tests
    # generate on first use, are made here (a fresh clone has none).
    sys.path.insert(0, str(HERE))
    from cri._gen import ensure_generated

    ensure_generated()
    emulated = accelerator() == "tcg"
    env = {
        "CI": os.environ.get("CI", "true"),
        "HOTRESTART_E2E_CGROUP_DRIVER": driver,
        "HOTRESTART_E2E_NODE_VM": "1",  # tests/e2e/test_node_install.py may set the machine up
        "HOTRESTART_E2E_MEMHOG": f"{shared_out}/memhog",
        "HOTRESTART_E2E_TIME_SCALE": TCG_TIME_SCALE if emulated else "1",
        # The shims' label lookup starts a Python helper, which takes seconds under emulation.
        **({"HOTRESTART_LABEL_LOOKUP_TIMEOUT": "60"} if emulated else {}),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    selected = pytest_args or SMOKE
    if emulated:
        selected = [*selected, *(x for t in TCG_DESELECT for x in ("--deselect", t))]
    keyed = [*selected, *([f"--shard={shard}"] if shard else [])]
    if shard:
        env["HOTRESTART_SHARD"] = shard
    sittings = None
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        key = node_key(driver, cgroup, emulated, keyed)
        if not key:
            log("--resume: the checkout differs from HEAD beyond the docs: no sitting counts, this one neither")
        sittings = Sittings(out, key)
        if sittings.done:
            log(f"--resume: {len(sittings.done)} test(s) passed in earlier sittings on this code; running the rest")
        env["HOTRESTART_PASSED_EARLIER"] = f"{shared_out}/passed-earlier.txt"
    else:
        (out / "output.key").unlink(missing_ok=True)
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    args = " ".join(shlex.quote(a) for a in selected)
    # pytest is interrupted (SIGINT: it reports what ran and tears down) before the machine's
    # own limit, so that the logs of a run that hangs still come back.
    deadline = int(max(60.0, timeout - PYTEST_MARGIN))
    # A line per test as it ends, so a run cut short says where; a test that outlives its
    # per-phase timeout without being interrupted gets every thread's stack dumped.
    pytest = (
        f"timeout --signal=INT --kill-after=60 {deadline} .venv/bin/python -m pytest -v -p no:cacheprovider "
        f"-o addopts= --timeout={TEST_TIMEOUT} -o faulthandler_timeout={TEST_TIMEOUT + 300} --durations=15 {args}"
    )
    # The logs of the run (containerd's, the shims', CRIU's) come back in logs.tgz.
    command = (
        f"cd {shlex.quote(str(REPO))} && export {exports} PATH={shared_out}/bin:$PATH && "
        f"echo v1mounts $(grep -c ' cgroup ' /proc/mounts) >> {shared_out}/node.txt; cat {shared_out}/node.txt && "
        f"{pytest}; rc=$?; "
        "journalctl --no-pager -u containerd > /tmp/node-containerd.log 2>&1; "
        f"find /tmp -name '*.log' -size -20M -print0 | tar -czf {shared_out}/logs.tgz --null -T - 2>/dev/null; "
        "exit $rc"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as build_dir:
        files = {"memhog": memhog(Path(build_dir))}
        # The installer's DaemonSet is rendered with kustomize, which Debian 12 does not carry.
        if kustomize := shutil.which("kustomize"):
            files["bin/kustomize"] = Path(kustomize)
        rc = run(command, timeout, out, files, cgroup)
    output = (out / "output.log").read_text(errors="replace") if (out / "output.log").exists() else ""
    sys.stdout.write(output)
    if sittings is not None:
        before = len(sittings.done)
        sittings.record(output, rc, time.monotonic() - started, node_key(driver, cgroup, emulated, keyed))
        # pytest says 5 when every test was deselected: all passed in earlier sittings.
        rc = 0 if rc == 5 and before and not _OUTCOME.search(output) else rc
        log(f"--resume: {len(sittings.done)} test(s) passed on this code over {len(sittings.sittings)} sitting(s)")
    return rc


def _shard(spec: str) -> str:
    try:
        k, n = shard.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"{k}/{n}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build")
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("command", nargs=argparse.REMAINDER)
    t = sub.add_parser("test")
    t.add_argument("--driver", choices=("systemd", "cgroupfs"), default="systemd")
    t.add_argument("--full", action="store_true", help="every integration and end-to-end test, not the smoke subset")
    t.add_argument("--cgroup", choices=tuple(CGROUP_CMDLINE), default="v2", help="v2 only, or systemd's hybrid v1")
    t.add_argument("--timeout", type=float, default=3000)
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("--resume", action="store_true", help="skip what passed in --out's earlier sittings on this code")
    t.add_argument("--shard", type=_shard, default=None, help="K/N: only the K-th of N parts of the selection")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    if os.geteuid() != 0:
        print("vm: run as root (9p passthrough shares, the image in /var/cache)", file=sys.stderr)
        return 2
    if ns.verb == "build":
        build(ns.force)
        return 0
    if ns.verb == "test" and ns.resume and ns.out is None:
        parser.error("--resume needs --out: the folder its earlier sittings wrote")
    out = (ns.out or Path(tempfile.mkdtemp(prefix="hotrestart-vm-"))).resolve()
    rest = [a for a in (ns.command if ns.verb == "run" else ns.pytest_args) if a != "--"] if ns.verb != "build" else []
    if ns.verb == "run":
        (out / "output.key").unlink(missing_ok=True)  # its output.log is no sitting's
        rc = run(" ".join(shlex.quote(a) for a in rest), ns.timeout, out)
        output = out / "output.log"
        if output.exists():
            sys.stdout.write(output.read_text(errors="replace"))
        return rc
    smoke = [*SMOKE, *SMOKE_DEFAULT_NODE] if (ns.driver, ns.cgroup) == ("systemd", "v2") else SMOKE
    full = FULL_CGROUPFS if (ns.driver, ns.cgroup) == ("cgroupfs", "v2") else FULL
    return test(ns.driver, rest or (full if ns.full else smoke), ns.timeout, out, ns.cgroup, ns.resume, ns.shard)


if __name__ == "__main__":
    sys.exit(main())
