"""`hotrestart install` / `uninstall` end to end against a scratch host root and fake bundles.

The host's programs (systemctl, containerd, the installed doctor) are stood in for at the one
place the installer runs them (`hostexec.run`): nothing is chrooted, nothing outside tmp_path
is touched, and each test sees exactly which host commands ran.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hotrestart import cli
from hotrestart.install import hostexec, node_label, upkeep, waiting
from hotrestart.install.hostexec import Result

CONTRACT = (
    "HOTRESTART_HOST_ROOT",
    "HOTRESTART_INSTALL_DIR",
    "HOTRESTART_CONTAINERD_CONFIG",
    "HOTRESTART_CONTAINERD_DROPIN",
    "HOTRESTART_RESTART",
    "HOTRESTART_CONTAINERD_UNIT",
    "HOTRESTART_RUNTIME_NAME",
    "HOTRESTART_STORE",
    "HOTRESTART_STORE_KEY_SOURCE",
    "HOTRESTART_S3_CONFIG_SOURCE",
    "HOTRESTART_RETENTION_MAX_AGE",
    "HOTRESTART_RETENTION_MAX_SIZE",
    "HOTRESTART_PRUNE_INTERVAL",
    "HOTRESTART_SYSTEMD_CGROUP",
    "NODE_NAME",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
)
ORIGINAL = b'# the admin\'s\nversion = 2\n\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause:3.10"\n'
V2_RUNTIMES = ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")
V3_RUNTIMES = ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes")


RUNC = {"runtime_type": "io.containerd.runc.v2", "sandbox_mode": "podsandbox", "options": {"SystemdCgroup": False}}
DEFAULTS: dict[int, dict[str, Any]] = {
    1: {
        "version": 2,
        "plugins": {
            "io.containerd.grpc.v1.cri": {
                "sandbox_image": "registry.k8s.io/pause:3.8",
                "containerd": {"default_runtime_name": "runc", "runtimes": {"runc": RUNC}},
            }
        },
    },
    2: {
        "version": 3,
        "plugins": {
            "io.containerd.cri.v1.images": {"pinned_images": {"sandbox": "registry.k8s.io/pause:3.10"}},
            "io.containerd.cri.v1.runtime": {
                "containerd": {"default_runtime_name": "runc", "runtimes": {"runc": RUNC}}
            },
        },
    },
}


def deep_merge(
    base: Mapping[str, Any], top: Mapping[str, Any], replace: frozenset[str] = frozenset()
) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if key in out and isinstance(out[key], Mapping) and isinstance(value, Mapping) and key not in replace:
            out[key] = deep_merge(out[key], value, replace)
        else:
            out[key] = value
    return out


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for containerd's dump: scalars, lists of them, tables."""
    lines = [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            lines.append(f"[{name}]\n{to_toml(value, name)}")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Host:
    """The scratch host: its root, what ran on it, and a containerd that merges like 2.x
    (imports deep-merged) or like 1.7 (an import replaces a plugin's section, and a file's
    `runtimes` table replaces the default runtimes)."""

    root: Path
    calls: list[list[str]] = dataclasses.field(default_factory=list)
    major: int = 2
    replaces_sections: bool = False  # 1.7's merge, whatever `major` says
    dump_ok: bool = True
    doctor_ok: bool = True

    def at(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    @property
    def config(self) -> Path:
        return self.at("/etc/containerd/config.toml")

    @property
    def dropin(self) -> Path:
        return self.at("/etc/containerd/conf.d/hotrestart.toml")

    @property
    def install_dir(self) -> Path:
        return self.at("/opt/hotrestart")

    def restarts(self) -> int:
        return sum(1 for c in self.calls if c[:2] == ["systemctl", "restart"])

    def merged(self, config: str) -> dict[str, Any]:
        main = tomllib.loads(self.at(config).read_text())
        files = [config, *main.get("imports", [])]
        tree: dict[str, Any] = {k: v for k, v in main.items() if k != "imports"}
        one_seven = self.major < 2 or self.replaces_sections
        for path in files[1:]:
            imported = tomllib.loads(self.at(path).read_text())
            plugins = imported.pop("plugins", {})
            tree = deep_merge(tree, {k: v for k, v in imported.items() if k != "imports"})
            if one_seven:
                tree["plugins"] = {**tree.get("plugins", {}), **plugins}
            else:
                tree = deep_merge(tree, {"plugins": plugins})
        effective = deep_merge(DEFAULTS[self.major], tree, frozenset({"runtimes"}) if one_seven else frozenset())
        return {**effective, "imports": files}

    def run(self, host_root: str, argv: list[str], *, timeout: float = 0, env: object = None) -> Result:
        assert host_root == str(self.root), "every host command runs in the host root"
        self.calls.append(list(argv))
        if argv[0] == "systemctl":
            return Result(0, "")
        if argv == ["containerd", "--version"]:
            if self.major < 2:
                return Result(0, "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n")
            return Result(0, "containerd github.com/containerd/containerd/v2 v2.1.9 0123abc\n")
        if argv == ["containerd", "config", "default"]:
            return Result(0, to_toml(DEFAULTS[self.major]))
        if argv[:2] == ["containerd", "--config"] and argv[3:] == ["config", "dump"]:
            if not self.dump_ok:
                return Result(1, "containerd: failed to load TOML: bad")
            return Result(0, to_toml(self.merged(argv[2])))
        if argv[0].endswith("/current/bin/hotrestart") and argv[1] == "doctor":
            return Result(0, "all checks passed") if self.doctor_ok else Result(1, "[MISSING] criu check\n1 check(s)")
        return Result(127, f"{argv[0]}: not found")

    def process(self, pid: int, exe: str, maps: str = "") -> None:
        """A host process, as /proc shows it."""
        folder = self.at(f"/proc/{pid}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "exe").unlink(missing_ok=True)
        (folder / "exe").symlink_to(exe)
        (folder / "maps").write_text(maps)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    for name in CONTRACT:
        monkeypatch.delenv(name, raising=False)
    h = Host(tmp_path / "host")
    h.at("/etc/containerd").mkdir(parents=True)
    h.process(1, "/usr/lib/systemd/systemd", "55d0 r-xp 0 fd:01 12 /usr/lib/systemd/systemd\n")
    monkeypatch.setenv("HOTRESTART_HOST_ROOT", str(h.root))
    monkeypatch.setattr(hostexec, "run", h.run)
    return h


def make_bundle(where: Path, version: str, payload: bytes = b"") -> Path:
    """A bundle's shape: launchers, a tool, a library, a link, the marker."""
    (where / "bin").mkdir(parents=True)
    (where / "lib" / "python3.11").mkdir(parents=True)
    (where / "share" / "hotrestart").mkdir(parents=True)
    for name in ("containerd-shim-hotrestart-v2", "hotrestart", "criu", "python3.11"):
        (where / "bin" / name).write_text(f"#!/bin/sh\n# {name} {version}\n")
        (where / "bin" / name).chmod(0o755)
    (where / "bin" / "python3").symlink_to("python3.11")
    (where / "lib" / "libpython3.11.so").write_bytes(b"\x7fELF" + payload)
    (where / "lib" / "python3.11" / "os.py").write_text("# os\n")
    (where / "lib" / "python3.11" / "os.py").chmod(0o664)  # group-writable: the copy drops that
    (where / "share" / "hotrestart" / "bundle.json").write_text(json.dumps({"version": version}))
    return where


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle-1", "0.1.0")


def hotrestart(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    code = done.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().out.splitlines()


def snapshot(*paths: Path) -> list[tuple[bytes, int, int] | None]:
    out: list[tuple[bytes, int, int] | None] = []
    for p in paths:
        if not os.path.lexists(p):
            out.append(None)
            continue
        st = p.lstat()
        data = os.fsencode(os.readlink(p)) if p.is_symlink() else p.read_bytes()
        out.append((data, st.st_ino, st.st_mtime_ns))
    return out


def version_of(h: Host) -> str:
    return os.readlink(h.install_dir / "current").removeprefix("versions/")


def test_install_twice_then_uninstall_twice(host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host.config.write_bytes(ORIGINAL)
    host.config.chmod(0o640)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    name = version_of(host)
    assert name.startswith("0.1.0-") and len(name) == len("0.1.0-") + 12
    assert out[-1] == f"hotrestart: installed {name}"
    assert "no Kubernetes API in reach: node label not set" in out
    assert host.restarts() == 1 and ["systemctl", "restart", "containerd"] in host.calls

    # The drop-in registers the runtime; the admin's file gained one line, after `version`.
    dropin = tomllib.loads(host.dropin.read_text())
    runtime = dropin
    for key in (*V2_RUNTIMES, "hotrestart"):
        runtime = runtime[key]
    assert runtime["runtime_path"] == "/opt/hotrestart/current/bin/containerd-shim-hotrestart-v2"
    assert runtime["options"]["CheckpointStore"] == "/var/lib/hotrestart/checkpoints"
    assert "StoreKeyFile" not in runtime["options"]
    assert stat.S_IMODE(host.dropin.stat().st_mode) == 0o644
    assert host.config.read_bytes() == ORIGINAL.replace(
        b"version = 2\n", b'version = 2\nimports = ["/etc/containerd/conf.d/hotrestart.toml"]\n'
    )
    assert stat.S_IMODE(host.config.stat().st_mode) == 0o640, "the admin's file keeps its mode"

    # The bundle, as it was, behind `current`; the state; the store.
    copy = host.install_dir / "versions" / name
    assert (copy / ".complete").is_file()
    assert stat.S_IMODE((copy / "bin" / "containerd-shim-hotrestart-v2").stat().st_mode) == 0o755
    assert stat.S_IMODE((copy / "lib" / "python3.11" / "os.py").stat().st_mode) == 0o644
    assert os.readlink(copy / "bin" / "python3") == "python3.11"
    assert (host.install_dir / "current" / "bin" / "criu").read_text() == (bundle / "bin" / "criu").read_text()
    assert (host.install_dir / "state" / "containerd-config.orig").read_bytes() == ORIGINAL
    recorded = json.loads((host.install_dir / "state" / "install.json").read_text())
    assert recorded["config_existed"] and recorded["dropin"] == "/etc/containerd/conf.d/hotrestart.toml"
    store = host.at("/var/lib/hotrestart/checkpoints")
    assert stat.S_IMODE(store.stat().st_mode) == 0o700

    # Again: nothing changes, nothing restarts.
    watched = (host.config, host.dropin, host.install_dir / "state" / "install.json", host.install_dir / "current")
    before = snapshot(*watched)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and out[-1] == f"hotrestart: installed {name}"
    assert snapshot(*watched) == before
    assert host.restarts() == 1
    assert "containerd: configuration unchanged, not restarted" in out
    assert f"bundle: {name} is installed already (/opt/hotrestart/versions/{name})" in out

    # Uninstall puts the admin's file back byte for byte and takes away all we added.
    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and out[-1] == "hotrestart: uninstalled", out
    assert host.config.read_bytes() == ORIGINAL
    assert stat.S_IMODE(host.config.stat().st_mode) == 0o640
    assert not host.dropin.exists() and not host.install_dir.exists()
    assert not host.at("/etc/containerd/conf.d").exists(), "the folder the drop-in needed goes too"
    assert host.restarts() == 2
    assert store.is_dir(), "the checkpoints stay"
    assert any(line.startswith("store: /var/lib/hotrestart/checkpoints left in place") for line in out)

    # Again: nothing to do.
    before = snapshot(host.config)
    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and out[-1] == "hotrestart: uninstalled"
    assert snapshot(host.config) == before and host.restarts() == 2


def test_no_main_file_one_is_made_and_removed_again(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    assert ["containerd", "--version"] in host.calls, "the host's containerd says which config version"
    assert host.config.read_text() == 'version = 3\nimports = ["/etc/containerd/conf.d/hotrestart.toml"]\n'
    runtimes = tomllib.loads(host.dropin.read_text())
    for key in V3_RUNTIMES:
        runtimes = runtimes[key]
    assert "hotrestart" in runtimes
    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and not host.config.exists()
    assert "containerd config: removed /etc/containerd/config.toml (there was none before the install)" in out


def cri_runtimes(merged: Mapping[str, Any]) -> dict[str, Any]:
    runtimes: dict[str, Any] = merged["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    return runtimes


def test_containerd_1_7_gets_a_block_in_its_main_file(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1.7 would let an imported file replace its whole CRI section: no drop-in there."""
    host.major = 1
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    assert not host.dropin.exists()
    text = host.config.read_text()
    assert text.startswith(ORIGINAL.decode() + "\n# >>> hotrestart: added by `hotrestart install`")
    assert text.endswith("# <<< hotrestart <<<\n")
    merged = host.merged("/etc/containerd/config.toml")
    assert set(cri_runtimes(merged)) == {"runc", "hotrestart"}, "the default runc is written out with ours"
    assert merged["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == "pause:3.10"
    assert cri_runtimes(merged)["hotrestart"]["runtime_path"].startswith("/opt/hotrestart/current/bin/")
    assert "containerd config: runtime block written in /etc/containerd/config.toml" in out
    assert host.restarts() == 1

    before = snapshot(host.config)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and snapshot(host.config) == before and host.restarts() == 1
    assert "containerd config: /etc/containerd/config.toml has our runtime's block already" in out

    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and host.config.read_bytes() == ORIGINAL and host.restarts() == 2


def test_containerd_1_7_without_a_main_file_gets_one_of_version_2(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.major = 1
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert ["containerd", "config", "default"] in host.calls, "its defaults, to keep runc"
    assert host.config.read_text().startswith("version = 2\n\n# >>> hotrestart")
    assert set(cri_runtimes(host.merged("/etc/containerd/config.toml"))) == {"runc", "hotrestart"}
    assert hotrestart(capsys, "uninstall")[0] == 0 and not host.config.exists()


def test_containerd_1_7_after_the_admin_edited_the_file_only_the_block_goes(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.major = 1
    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    host.config.write_bytes(host.config.read_bytes() + b"[metrics]\n  address = ':1338'\n")
    code, _out = hotrestart(capsys, "uninstall")
    assert code == 0
    assert host.config.read_bytes() == ORIGINAL + b"[metrics]\n  address = ':1338'\n"


def test_an_import_that_would_lose_the_admins_settings_is_refused(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever the version says, containerd's merged view decides: here it loses settings."""
    host.replaces_sections = True
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1
    assert out[-1].startswith("hotrestart: install failed: with our change containerd's merged configuration")
    assert "/plugins/io.containerd.grpc.v1.cri/sandbox_image" in out[-1]
    assert "containerd config: put back as it was" in out
    assert host.config.read_bytes() == ORIGINAL and not host.dropin.exists() and host.restarts() == 0


def test_a_version_1_config_is_refused_before_anything_changes(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.config.write_bytes(b'[plugins.cri]\n  sandbox_image = "pause"\n')
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1
    assert "config version 1 is not supported" in out[-1] and out[-1].startswith("hotrestart: install failed: ")
    assert host.config.read_bytes() == b'[plugins.cri]\n  sandbox_image = "pause"\n'
    assert not host.install_dir.exists() and not host.dropin.exists() and host.calls == []


def test_uninstall_after_the_admin_edited_the_file_removes_only_the_import(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    edited = host.config.read_bytes() + b'[metrics]\n  address = "127.0.0.1:1338"\n'
    host.config.write_bytes(edited)
    code, out = hotrestart(capsys, "uninstall")
    assert code == 0
    assert host.config.read_bytes() == ORIGINAL + b'[metrics]\n  address = "127.0.0.1:1338"\n'
    assert any("was changed since the install: took out only what we added" in line for line in out)


def test_an_empty_imports_line_comes_back_as_it_was(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `containerd config default` writes `imports = []`: the uninstall empties it again rather
    # than taking the line out (which made a kubeadm node's file differ from its original).
    original = b"version = 3\nroot = '/var/lib/containerd'\nimports = []\n\n[grpc]\n  address = '/run/c.sock'\n"
    for admin_edit in (b"", b"\n[metrics]\n  address = '127.0.0.1:1338'\n"):
        host.config.write_bytes(original)
        assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
        assert b'imports = ["/etc/containerd/conf.d/hotrestart.toml"]\n' in host.config.read_bytes()
        host.config.write_bytes(host.config.read_bytes() + admin_edit)
        code, out = hotrestart(capsys, "uninstall")
        assert code == 0, out
        assert host.config.read_bytes() == original + admin_edit, out


def test_an_admin_edit_survives_a_later_install_run_and_the_uninstall(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Install, the admin edits the file, the installer's pod runs again (a reboot, a
    rollout), then uninstall: the edit stays, only our import goes."""
    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    metrics = b'[metrics]\n  address = "127.0.0.1:1338"\n'
    host.config.write_bytes(host.config.read_bytes() + metrics)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    code, out = hotrestart(capsys, "uninstall")
    assert code == 0, out
    assert host.config.read_bytes() == ORIGINAL + metrics


def test_an_upgrade_switches_current_and_keeps_the_version_in_use(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    old = version_of(host)
    # A shim of a running pod was started from the old version.
    host.process(
        4242,
        f"/opt/hotrestart/versions/{old}/bin/python3.11",
        f"7f00 r-xp 0 fd:01 99 /opt/hotrestart/versions/{old}/lib/libpython3.11.so\n",
    )
    newer = make_bundle(tmp_path / "bundle-2", "0.2.0", b"changed")
    code, out = hotrestart(capsys, "install", "--bundle", str(newer))
    assert code == 0, out
    new = version_of(host)
    assert new.startswith("0.2.0-") and new != old
    assert f"current: {new} (was {old})" in out
    assert any(line.startswith(f"versions: kept {old}: still in use") for line in out)
    assert sorted(os.listdir(host.install_dir / "versions")) == sorted([old, new])
    assert sorted(os.listdir(host.install_dir)) == ["current", "state", "versions"], "no temporary link left"
    assert host.restarts() == 1, "runtime_path goes through `current`: an upgrade needs no restart"

    # The same version string with other contents is another folder, never a copy over it.
    same_version = make_bundle(tmp_path / "bundle-3", "0.2.0", b"rebuilt")
    assert hotrestart(capsys, "install", "--bundle", str(same_version))[0] == 0
    assert version_of(host) not in (old, new)

    # The pod went: the next run removes what nothing uses.
    (host.at("/proc/4242/exe")).unlink()
    (host.at("/proc/4242/maps")).write_text("")
    code, out = hotrestart(capsys, "install", "--bundle", str(newer))
    assert code == 0 and os.listdir(host.install_dir / "versions") == [new]
    assert f"versions: removed {old} (no longer used)" in out


def test_versions_stay_when_proc_cannot_be_read(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    old = version_of(host)
    for entry in host.at("/proc").iterdir():
        for f in entry.iterdir():
            f.unlink()
        entry.rmdir()
    code, out = hotrestart(capsys, "install", "--bundle", str(make_bundle(tmp_path / "b2", "0.2.0")))
    assert code == 0
    assert old in os.listdir(host.install_dir / "versions")
    assert any(line.startswith(f"versions: kept {old}: cannot tell whether they are in use") for line in out)


def test_a_configuration_containerd_refuses_is_put_back(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host.config.write_bytes(ORIGINAL)
    host.dump_ok = False
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "containerd refuses the configuration" in out[-1]
    assert host.config.read_bytes() == ORIGINAL and not host.dropin.exists()
    assert host.restarts() == 0


def test_a_failed_restart_is_tried_again_by_the_next_run(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host.config.write_bytes(ORIGINAL)
    real = host.run
    failing = [True]

    def flaky_systemctl(host_root: str, argv: list[str], **kw: Any) -> Result:
        if argv[0] == "systemctl" and failing[0]:
            host.calls.append(argv)
            return Result(1, "Job for containerd.service failed.")
        return real(host_root, argv, **kw)

    monkeypatch.setattr(hostexec, "run", flaky_systemctl)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "systemctl restart containerd failed (exit 1): Job for containerd.service failed." in out[-1]
    failing[0] = False
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and host.restarts() == 2, "nothing changed in this run, but the change waits for a restart"
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and host.restarts() == 2


def test_restart_none_restarts_nothing_and_says_so(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTRESTART_RESTART", "none")
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and host.restarts() == 0
    assert any(line.startswith("containerd: NOT restarted (HOTRESTART_RESTART=none)") for line in out)


KEY = "A" * 43 + "="  # base64 of 32 zero bytes
KEY2 = base64.b64encode(bytes(range(32))).decode()


def write_key(path: Path, text: str = f"k1:{KEY}\n") -> None:
    path.write_text(text)
    path.chmod(0o600)


def test_the_store_key_is_copied_and_named(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Secret volume: the key files are links into a timestamped folder, `..data` between.
    secret = tmp_path / "secret"
    (secret / "..2025_01_01").mkdir(parents=True)
    write_key(secret / "..2025_01_01" / "k1", KEY)
    (secret / "..data").symlink_to("..2025_01_01")
    (secret / "k1").symlink_to("..data/k1")
    monkeypatch.setenv("HOTRESTART_STORE_KEY_SOURCE", str(secret))
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    key = host.at("/etc/hotrestart/store-key")
    assert key.read_text() == f"k1:{KEY}\n" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert 'StoreKeyFile = "/etc/hotrestart/store-key"' in host.dropin.read_text()
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert host.restarts() == 1, "the same key again is no change"

    # A rotated key is a change containerd's shims must see.
    write_key(secret / "..2025_01_01" / "k2", KEY2)
    (secret / "k2").symlink_to("..data/k2")
    write_key(secret / "..2025_01_01" / "active", "k2")
    (secret / "active").symlink_to("..data/active")
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and host.restarts() == 2
    assert key.read_text() == f"k2:{KEY2}\nk1:{KEY}\n", "the active key first, as the key file has it"

    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and not key.exists() and "store key: removed /etc/hotrestart/store-key" in out
    assert not host.at("/etc/hotrestart").exists()


S3_CONFIG = (
    "[default]\nregion = eu-west-3\nendpoint_url = http://rgw.storage:7480\n"
    "aws_access_key_id = AK\naws_secret_access_key = SK\n"
)


def test_an_object_store_with_its_s3_config_from_a_secret(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "store-key"
    write_key(key)
    secret = tmp_path / "s3"
    (secret / "..2025_01_01").mkdir(parents=True)
    (secret / "..2025_01_01" / "s3-config").write_text(S3_CONFIG)
    (secret / "..2025_01_01" / "s3-config").chmod(0o400)
    (secret / "..data").symlink_to("..2025_01_01")
    (secret / "s3-config").symlink_to("..data/s3-config")
    monkeypatch.setenv("HOTRESTART_STORE", "s3://checkpoints/cluster-a/")
    monkeypatch.setenv("HOTRESTART_STORE_KEY_SOURCE", str(key))
    monkeypatch.setenv("HOTRESTART_S3_CONFIG_SOURCE", str(secret / "s3-config"))
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    conf = host.at("/etc/hotrestart/s3-config")
    assert conf.read_text() == S3_CONFIG and stat.S_IMODE(conf.stat().st_mode) == 0o600
    dropin = host.dropin.read_text()
    assert 'CheckpointStore = "s3://checkpoints/cluster-a"' in dropin
    assert 'S3ConfigFile = "/etc/hotrestart/s3-config"' in dropin
    assert "store: s3://checkpoints/cluster-a (an object store)" in out
    assert not host.at("/var/lib/hotrestart").exists(), "no local store folder for an object store"
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert host.restarts() == 1, "the same config again is no change"

    # New credentials are a change containerd's shims must see.
    (secret / "..2025_01_01" / "s3-config").chmod(0o600)
    (secret / "..2025_01_01" / "s3-config").write_text(S3_CONFIG.replace("SK", "SK2"))
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert host.restarts() == 2 and "SK2" in conf.read_text()

    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and not conf.exists() and "S3 config: removed /etc/hotrestart/s3-config" in out
    assert not host.at("/etc/hotrestart").exists()


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"HOTRESTART_STORE": "s3://checkpoints/x"}, "set HOTRESTART_STORE_KEY_SOURCE"),
        ({"HOTRESTART_STORE": "s3://UPPER/x", "HOTRESTART_STORE_KEY_SOURCE": "KEY"}, "not a bucket name"),
        ({"HOTRESTART_S3_CONFIG_SOURCE": "relative/s3"}, "give an absolute path"),
        ({"HOTRESTART_S3_CONFIG_SOURCE": "CONF:not ini ["}, "not an AWS config file"),
        ({"HOTRESTART_S3_CONFIG_SOURCE": "CONF:"}, "no profile"),
    ],
)
def test_bad_object_store_settings_are_refused_before_the_host_changes(
    host: Host,
    tmp_path: Path,
    bundle: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    error: str,
) -> None:
    key = tmp_path / "store-key"
    write_key(key)
    for name, value in env.items():
        if value == "KEY":
            value = str(key)
        elif value.startswith("CONF:"):
            conf = tmp_path / "s3-config"
            conf.write_text(value.removeprefix("CONF:"))
            conf.chmod(0o600)
            value = str(conf)
        monkeypatch.setenv(name, value)
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code != 0 and error in out[-1], out
    assert host.config.read_bytes() == ORIGINAL and not host.install_dir.exists()


def test_a_store_key_the_installer_did_not_write_is_never_replaced_or_removed(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "store-key"
    write_key(source)
    monkeypatch.setenv("HOTRESTART_STORE_KEY_SOURCE", str(source))
    host.config.write_bytes(ORIGINAL)
    key = host.at("/etc/hotrestart/store-key")
    key.parent.mkdir(parents=True)

    # Another key there: refused before anything on the host changes.
    write_key(key, f"k2:{KEY2}\n")
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code != 0 and "holds another store key" in out[-1], out
    assert key.read_text() == f"k2:{KEY2}\n" and not host.install_dir.exists() and host.calls[-1:] != ["systemctl"]

    # The same key, put there by the admin: used, and kept by the uninstall.
    write_key(key)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert 'StoreKeyFile = "/etc/hotrestart/store-key"' in host.dropin.read_text()
    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and key.read_text() == f"k1:{KEY}\n", out


def test_a_key_from_a_secret_volume_file(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store-key component mounts one item: `store-key -> ..data/store-key`."""
    secret = tmp_path / "secret"
    (secret / "..2025_01_01").mkdir(parents=True)
    write_key(secret / "..2025_01_01" / "store-key")
    (secret / "..data").symlink_to("..2025_01_01")
    (secret / "store-key").symlink_to("..data/store-key")
    monkeypatch.setenv("HOTRESTART_STORE_KEY_SOURCE", str(secret / "store-key"))
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    assert host.at("/etc/hotrestart/store-key").read_text() == f"k1:{KEY}\n"


def test_a_key_source_that_is_a_link_or_not_private_is_refused(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_key(tmp_path / "real")
    (tmp_path / "mounted").mkdir()
    (tmp_path / "mounted" / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("HOTRESTART_STORE_KEY_SOURCE", str(tmp_path / "mounted" / "link"))
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "links outside its folder" in out[-1] and host.calls == []
    (tmp_path / "real").chmod(0o644)
    monkeypatch.setenv("HOTRESTART_STORE_KEY_SOURCE", str(tmp_path / "real"))
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "gives group or others access" in out[-1]
    assert not host.install_dir.exists()


def test_links_in_the_host_paths_are_not_followed(
    host: Host, tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.toml").write_bytes(ORIGINAL)
    host.at("/etc/containerd").rmdir()
    host.at("/etc/containerd").symlink_to(elsewhere)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "/etc/containerd is a symbolic link, not a folder" in out[-1]
    assert os.listdir(elsewhere) == ["config.toml"] and (elsewhere / "config.toml").read_bytes() == ORIGINAL

    # The install folder too: a link planted at /opt/hotrestart is not written through.
    host.at("/etc/containerd").unlink()
    host.at("/etc/containerd").mkdir()
    host.at("/opt").mkdir()
    host.at("/opt/hotrestart").symlink_to(elsewhere)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "/opt/hotrestart is a symbolic link" in out[-1]
    assert os.listdir(elsewhere) == ["config.toml"]


def test_without_containerd_on_the_hosts_path_only_version_3_is_certain(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = host.run

    def no_containerd(host_root: str, argv: list[str], **kw: Any) -> Result:
        return Result(127, "containerd: not found") if argv[0] == "containerd" else real(host_root, argv, **kw)

    monkeypatch.setattr(hostexec, "run", no_containerd)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "containerd is not on the host's PATH" in out[-1] and "does not exist" in out[-1]
    host.config.write_bytes(ORIGINAL)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and "says version 2" in out[-1] and host.config.read_bytes() == ORIGINAL
    v3 = b"version = 3\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'pause:3.10'\n"
    host.config.write_bytes(v3)
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0, out
    assert "containerd: not on the host's PATH: its merged configuration is not checked" in out
    assert "SystemdCgroup: false (cgroup v1 on the host)" in out, "no runc to follow: the host's cgroups decide"
    assert host.dropin.exists() and host.restarts() == 1
    assert hotrestart(capsys, "uninstall")[0] == 0 and host.config.read_bytes() == v3


def dropin_options(h: Host) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(h.dropin.read_text())
    for key in (*(V3_RUNTIMES if table["version"] == 3 else V2_RUNTIMES), "hotrestart", "options"):
        table = table[key]
    return table


def test_systemd_cgroup_auto_follows_runc(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet's cgroup driver works with runc's: ours is the same."""
    host.at("/sys/fs/cgroup").mkdir(parents=True)
    host.at("/sys/fs/cgroup/cgroup.controllers").write_text("cpu memory\n")
    host.config.write_bytes(ORIGINAL)  # runc as containerd's defaults have it: cgroupfs
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and "SystemdCgroup: false, as containerd's runc runtime has it" in out
    assert dropin_options(host)["SystemdCgroup"] is False
    assert hotrestart(capsys, "uninstall")[0] == 0
    host.config.write_bytes(
        b"version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n"
        b"  SystemdCgroup = true\n"
    )
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert dropin_options(host)["SystemdCgroup"] is True
    assert hotrestart(capsys, "uninstall")[0] == 0
    monkeypatch.setenv("HOTRESTART_SYSTEMD_CGROUP", "false")
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    assert dropin_options(host)["SystemdCgroup"] is False, "what the manifest says wins"


def test_outside_a_bundle_install_needs_one_named(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = hotrestart(capsys, "install")
    assert code == 1 and "not running from a bundle: give the bundle to install with --bundle DIR" in out[-1]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, host: Host) -> Iterator[list[tuple[str | None, bool]]]:
    """A cluster: each label change, and whether the drop-in was still there at the time."""
    changes: list[tuple[str | None, bool]] = []
    monkeypatch.setenv("NODE_NAME", "node-a")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    fake = node_label.Api("https://10.0.0.1:443", "token", None, "node-a")
    monkeypatch.setattr(node_label, "in_cluster", lambda settings: fake)
    monkeypatch.setattr(node_label, "set_label", lambda a, value: changes.append((value, host.dropin.exists())))
    yield changes


def test_the_node_is_labelled_once_the_doctor_passes_and_unlabelled_first(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], api: list[tuple[str | None, bool]]
) -> None:
    host.config.write_bytes(ORIGINAL)
    host.doctor_ok = False
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 1 and api == []
    assert "doctor: [MISSING] criu check" in out
    assert any(line.startswith("doctor: FAILED (exit 1): node label not set") for line in out)
    doctor = next(c for c in host.calls if c[1:2] == ["doctor"])
    assert doctor == [
        "/opt/hotrestart/current/bin/hotrestart",
        "doctor",
        "--containerd-config",
        "/etc/containerd/config.toml",
    ]

    host.doctor_ok = True
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle))
    assert code == 0 and api == [("true", True)]
    assert "node node-a: labelled hotrestart.io/ready=true" in out

    code, out = hotrestart(capsys, "uninstall")
    assert code == 0 and api[-1] == (None, True), "the label goes before the runtime does"
    assert not host.dropin.exists()


def test_uninstall_stops_when_the_label_cannot_be_removed(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotrestart.install.errors import InstallError

    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    monkeypatch.setenv("NODE_NAME", "node-a")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(node_label, "in_cluster", lambda s: node_label.Api("https://x", "t", None, "node-a"))

    def refuse(a: node_label.Api, value: str | None) -> None:
        raise InstallError("node node-a: label hotrestart.io/ready: HTTP 403: forbidden")

    monkeypatch.setattr(node_label, "set_label", refuse)
    code, out = hotrestart(capsys, "uninstall")
    assert code == 1 and "HTTP 403" in out[-1]
    assert host.dropin.exists() and host.install_dir.exists(), "nothing removed while the label stays"


def fake_wait(ticks: int, before_tick: Callable[[], None] = lambda: None) -> Callable[..., None]:
    def until_stopped(
        interval: float, tick: Callable[[], None], say: Callable[[str], None], stop: object = None
    ) -> None:
        assert interval == 600.0
        for _ in range(ticks):
            before_tick()
            tick()

    return until_stopped


def test_install_wait_prunes_and_retries_the_doctor(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host.config.write_bytes(ORIGINAL)
    host.doctor_ok = False
    pruned: list[str] = []
    real_prune = upkeep.prune

    def prune(settings: object, say: Callable[[str], None]) -> None:
        pruned.append("once")
        real_prune(settings, say)  # type: ignore[arg-type]

    monkeypatch.setattr(upkeep, "prune", prune)

    def doctor_heals() -> None:
        host.doctor_ok = True

    monkeypatch.setattr(waiting, "until_stopped", fake_wait(2, doctor_heals))
    code, out = hotrestart(capsys, "install", "--bundle", str(bundle), "--wait")
    assert code == 0, "stopped, the runtime stays installed"
    assert pruned == ["once", "once"]
    doctors = [c for c in host.calls if c[1:2] == ["doctor"]]
    assert len(doctors) == 2, "retried until it passed, then not again"
    assert out.count("no Kubernetes API in reach: node label not set") == 1
    assert host.dropin.exists() and host.install_dir.exists()


def test_uninstall_wait_removes_versions_once_unused(
    host: Host, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host.config.write_bytes(ORIGINAL)
    assert hotrestart(capsys, "install", "--bundle", str(bundle))[0] == 0
    name = version_of(host)
    host.process(77, f"/opt/hotrestart/versions/{name}/bin/python3.11")

    def pod_goes() -> None:
        host.at("/proc/77/exe").unlink()

    monkeypatch.setattr(waiting, "until_stopped", fake_wait(1, pod_goes))
    code, out = hotrestart(capsys, "uninstall", "--wait")
    assert code == 0
    assert f"versions: kept {name}: still in use by running processes (shims of pods started with it)" in out
    assert "hotrestart: uninstalled" in out
    assert host.config.read_bytes() == ORIGINAL
    assert f"versions: removed {name} (no longer used)" in out
    assert not host.install_dir.exists()


def test_the_wait_ends_on_sigterm_and_survives_a_failing_tick() -> None:
    import signal

    said: list[str] = []
    ticks = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 1:
            raise RuntimeError("upkeep broke")
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    waiting.until_stopped(0.01, tick, said.append)
    assert len(ticks) == 2
    assert said[0].startswith("upkeep failed: RuntimeError('upkeep broke')")
    assert said[-1] == "SIGTERM: stopping (the runtime stays installed)"
    assert signal.getsignal(signal.SIGTERM) == before
    stop = threading.Event()
    stop.set()
    waiting.until_stopped(0.01, lambda: None, said.append, stop)  # a set event: no tick at all
