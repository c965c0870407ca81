"""The installer's reach into the host: its settings, file operations, /proc and bundle copies."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hotrestart.install import in_use, settings, versions
from hotrestart.install.errors import InstallError
from hotrestart.install.hostexec import HOST_PATH
from hotrestart.install.hostfs import HostFS
from hotrestart.install.restart import systemctl_restart


def test_settings_defaults_are_the_contract() -> None:
    s = settings.from_env({})
    assert s == settings.Settings(
        host_root="/host",
        install_dir="/opt/hotrestart",
        containerd_config="/etc/containerd/config.toml",
        containerd_dropin="/etc/containerd/conf.d/hotrestart.toml",
        restart="systemd",
        containerd_unit="containerd",
        runtime_name="hotrestart",
        store="/var/lib/hotrestart/checkpoints",
        store_key_source="",
        retention_max_age=None,
        retention_max_size=None,
        prune_interval=600.0,
        systemd_cgroup="auto",
        node_name="",
        api_host="",
        api_port="443",
    )
    assert s.store_key == "" and s.on_host("/etc/x") == "/host/etc/x"


def test_settings_from_the_environment() -> None:
    s = settings.from_env(
        {
            "HOTRESTART_HOST_ROOT": "/mnt/host/",
            "HOTRESTART_CONTAINERD_CONFIG": "/etc/k3s/containerd/config.toml",
            "HOTRESTART_RESTART": "None",
            "HOTRESTART_CONTAINERD_UNIT": "k3s.service",
            "HOTRESTART_RUNTIME_NAME": "hot-gpu",
            "HOTRESTART_STORE_KEY_SOURCE": "/etc/hotrestart-key",
            "HOTRESTART_RETENTION_MAX_AGE": "24h",
            "HOTRESTART_RETENTION_MAX_SIZE": "50G",
            "HOTRESTART_PRUNE_INTERVAL": "30s",
            "HOTRESTART_SYSTEMD_CGROUP": "true",
            "NODE_NAME": "node-a",
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "6443",
        }
    )
    assert s.host_root == "/mnt/host"
    assert s.containerd_dropin == "/etc/k3s/containerd/conf.d/hotrestart.toml", "beside the main file"
    assert (s.restart, s.containerd_unit, s.runtime_name) == ("none", "k3s.service", "hot-gpu")
    assert s.store_key == "/etc/hotrestart/store-key"
    assert (s.retention_max_age, s.retention_max_size, s.prune_interval) == (86400.0, 50 << 30, 30.0)
    assert (s.systemd_cgroup, s.node_name, s.api_host, s.api_port) == ("true", "node-a", "10.96.0.1", "6443")


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("HOTRESTART_INSTALL_DIR", "opt/hotrestart", "absolute path"),
        ("HOTRESTART_CONTAINERD_DROPIN", "/etc/containerd/../x.toml", "without '..'"),
        ("HOTRESTART_RESTART", "openrc", "use one of systemd, none"),
        ("HOTRESTART_CONTAINERD_UNIT", "--now", "not a systemd unit name"),
        ("HOTRESTART_RUNTIME_NAME", 'hot"]\n[x', "DNS label"),
        ("HOTRESTART_RETENTION_MAX_SIZE", "lots", "invalid size"),
        ("HOTRESTART_RETENTION_MAX_AGE", "7d", "invalid duration"),
        ("HOTRESTART_PRUNE_INTERVAL", "0s", "more than zero"),
        ("HOTRESTART_SYSTEMD_CGROUP", "yes", "auto, true, false"),
        ("HOTRESTART_STORE_KEY_SOURCE", "key", "absolute path"),
    ],
)
def test_bad_settings_are_refused_by_name(name: str, value: str, why: str) -> None:
    with pytest.raises(InstallError, match=name) as caught:
        settings.from_env({name: value})
    assert why in str(caught.value)


def test_host_commands_are_built_once() -> None:
    assert systemctl_restart("containerd") == ["systemctl", "restart", "containerd"]
    assert HOST_PATH == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_writes_are_atomic_root_owned_and_idempotent(tmp_path: Path) -> None:
    fs = HostFS(str(tmp_path))
    assert fs.write("/etc/hotrestart/store-key", b"k1:x\n", 0o600)
    key = tmp_path / "etc" / "hotrestart" / "store-key"
    assert key.read_bytes() == b"k1:x\n" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "etc" / "hotrestart").stat().st_mode) == 0o755
    assert key.stat().st_uid == os.geteuid()
    ino = key.stat().st_ino
    assert not fs.write("/etc/hotrestart/store-key", b"k1:x\n", 0o600), "the same bytes: no write"
    assert key.stat().st_ino == ino
    assert fs.write("/etc/hotrestart/store-key", b"k1:x\n", 0o400), "another mode is a change"
    elsewhere = tmp_path / "hard-link"
    os.link(key, elsewhere)  # a hard link planted to a file outside: never written through
    assert fs.write("/etc/hotrestart/store-key", b"k2:y\n", 0o400)
    assert key.read_bytes() == b"k2:y\n" and elsewhere.read_bytes() == b"k1:x\n"
    assert os.listdir(key.parent) == ["store-key"], "no temporary file left"
    (tmp_path / "etc" / "keep").mkdir(mode=0o700)
    fs.write("/etc/keep/x", b"", 0o644)
    assert stat.S_IMODE((tmp_path / "etc" / "keep").stat().st_mode) == 0o700, "folders there keep their mode"


def test_links_and_special_files_are_refused(tmp_path: Path) -> None:
    fs = HostFS(str(tmp_path / "host"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.toml").write_text("theirs")
    (tmp_path / "host" / "etc").mkdir(parents=True)
    (tmp_path / "host" / "etc" / "containerd").symlink_to(outside)
    for do in (
        lambda: fs.write("/etc/containerd/config.toml", b"x", 0o644),
        lambda: fs.read("/etc/containerd/config.toml"),
        lambda: fs.remove("/etc/containerd/config.toml"),
        lambda: fs.make_dirs("/etc/containerd/conf.d", 0o755),
    ):
        with pytest.raises(InstallError, match="/etc/containerd is a symbolic link, not a folder"):
            do()
    assert os.listdir(outside) == ["config.toml"] and (outside / "config.toml").read_text() == "theirs"
    (tmp_path / "host" / "etc" / "link.toml").symlink_to(outside / "config.toml")
    with pytest.raises(InstallError, match="is a symbolic link"):
        fs.write("/etc/link.toml", b"x", 0o644)
    with pytest.raises(InstallError, match="is a symbolic link, not a file"):
        fs.read("/etc/link.toml")
    os.mkfifo(tmp_path / "host" / "etc" / "fifo")
    with pytest.raises(InstallError, match="not a regular file"):
        fs.read("/etc/fifo")
    with pytest.raises(InstallError, match=r"'\.' and '\.\.' are not allowed"):
        fs.read("/etc/../../outside/config.toml")
    (tmp_path / "host" / "etc" / "big").write_bytes(b"x" * 11)
    with pytest.raises(InstallError, match="larger than 10 bytes"):
        fs.read("/etc/big", 10)
    assert fs.read("/etc/missing") is None and fs.read("/nowhere/at/all") is None


def test_symlinks_switch_in_one_rename(tmp_path: Path) -> None:
    fs = HostFS(str(tmp_path))
    assert fs.symlink("/opt/h/current", "versions/a")
    assert not fs.symlink("/opt/h/current", "versions/a")
    assert fs.symlink("/opt/h/current", "versions/b")
    assert os.readlink(tmp_path / "opt" / "h" / "current") == "versions/b"
    assert os.listdir(tmp_path / "opt" / "h") == ["current"]
    (tmp_path / "opt" / "h" / "dir").mkdir()
    with pytest.raises(InstallError, match="is a folder, not a link"):
        fs.symlink("/opt/h/dir", "versions/b")


def test_proc_tells_which_versions_run(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, exe, maps in (
        (1, "/usr/lib/systemd/systemd", ""),
        (10, "/opt/hotrestart/versions/a/bin/python3.11", ""),
        (11, "/usr/bin/python3", "7f0 r-xp 0 fd:01 2 /opt/hotrestart/versions/b/lib/lib x.so (deleted)\n"),
    ):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "exe").symlink_to(exe)
        (proc / str(pid) / "maps").write_text(maps)
    (proc / "12").mkdir()  # a kernel thread: no executable, no mappings
    (proc / "self").mkdir()
    usage = in_use.scan(str(tmp_path), "/opt/hotrestart/versions", "/opt/hotrestart")
    assert usage.known
    assert usage.paths == {
        "/opt/hotrestart/versions/a/bin/python3.11",
        "/opt/hotrestart/versions/b/lib/lib x.so",
    }
    assert usage.uses("/opt/hotrestart/versions/a") and usage.uses("/opt/hotrestart/versions/b")
    assert not usage.uses("/opt/hotrestart/versions/c") and not usage.uses("/opt/hotrestart/versions/a2")
    empty = in_use.scan(str(tmp_path / "nothing"), "/opt/hotrestart/versions", "/opt/hotrestart")
    assert not empty.known and "cannot read" in empty.why


def test_a_process_even_root_may_not_read_counts_when_it_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "proc"
    for pid, cmdline in ((1, b"/sbin/sandbox-init\0"), (20, b"/usr/bin/python3\0-m\0x\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "exe").symlink_to("/secret")
        (proc / str(pid) / "maps").write_text("")
        (proc / str(pid) / "cmdline").write_bytes(cmdline)
    real = os.readlink

    def protected(path: str | os.PathLike[str], *a: object, **kw: object) -> str:
        if str(path).endswith("/1/exe"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "readlink", protected)
    usage = in_use.scan(str(tmp_path), "/opt/hotrestart/versions", "/opt/hotrestart")
    assert usage.known, "a protected process that is not ours"
    (proc / "1" / "cmdline").write_bytes(b"/opt/hotrestart/current/bin/python3\0shim\0")
    usage = in_use.scan(str(tmp_path), "/opt/hotrestart/versions", "/opt/hotrestart")
    assert not usage.known and usage.why == "process 1 runs from /opt/hotrestart and cannot be read"


def make_tree(root: Path, version: str = "1.2.3") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "share" / "hotrestart").mkdir(parents=True)
    (root / "share" / "hotrestart" / "bundle.json").write_text(json.dumps({"version": version}))
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o4775)
    (root / "bin" / "alias").symlink_to("tool")
    return root


def test_the_version_name_is_the_version_and_the_trees_digest(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b")
    assert versions.version_name(str(a)) == versions.version_name(str(b)), "the same tree anywhere"
    name = versions.version_name(str(a))
    assert name.startswith("1.2.3-") and len(name.split("-")[1]) == 12
    (b / "bin" / "tool").chmod(0o755)  # set-id bits are dropped in the copy, so count for nothing
    assert versions.version_name(str(b)) == name
    (b / "bin" / "tool").chmod(0o700)
    assert versions.version_name(str(b)) != name, "modes count"
    (b / "bin" / "tool").chmod(0o755)
    (b / "bin" / "alias").unlink()
    (b / "bin" / "alias").symlink_to("other")
    assert versions.version_name(str(b)) != name, "link targets count"
    (b / "bin" / "alias").unlink()
    (b / "bin" / "alias").symlink_to("tool")
    (b / "share" / "__pycache__").mkdir()
    (b / "share" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert versions.version_name(str(b)) == name, "Python's caches, written as it runs, are no new version"
    odd = make_tree(tmp_path / "odd", "1.0/../../x y")
    assert versions.bundle_version(str(odd)) == "1.0_.._.._x_y"


def test_bundles_with_links_out_or_special_files_are_refused(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    (a / "bin" / "escape").symlink_to("../../etc/shadow")
    with pytest.raises(InstallError, match="links outside the bundle"):
        versions.version_name(str(a))
    (a / "bin" / "escape").unlink()
    (a / "bin" / "abs").symlink_to("/usr/bin/python3")
    with pytest.raises(InstallError, match="links outside the bundle"):
        versions.version_name(str(a))
    (a / "bin" / "abs").unlink()
    os.mkfifo(a / "bin" / "fifo")
    with pytest.raises(InstallError, match="special file"):
        versions.version_name(str(a))
    with pytest.raises(InstallError, match="is not a bundle"):
        versions.version_name(str(tmp_path / "nothing"))


def test_a_copy_cut_short_is_cleaned_up_and_redone(tmp_path: Path) -> None:
    fs = HostFS(str(tmp_path / "host"))
    bundle = make_tree(tmp_path / "bundle")
    name = versions.version_name(str(bundle))
    stale = tmp_path / "host" / "opt" / "h" / "versions" / f".tmp-{name}-dead"
    stale.mkdir(parents=True)
    (stale / "half").write_text("x")
    half = tmp_path / "host" / "opt" / "h" / "versions" / name
    half.mkdir()  # there, but never marked complete
    said: list[str] = []
    assert versions.install(fs, "/opt/h", str(bundle), name, said.append)
    assert sorted(os.listdir(half.parent)) == [name]
    assert (half / ".complete").exists()
    assert stat.S_IMODE((half / "bin" / "tool").stat().st_mode) == 0o755
    assert not versions.install(fs, "/opt/h", str(bundle), name, said.append)


def test_upkeep_prunes_the_hosts_store_and_never_fails(tmp_path: Path) -> None:
    import time

    from storekit import make_checkpoint

    from hotrestart.install import upkeep
    from hotrestart.store.store import Store

    host = tmp_path / "host"
    store = Store(str(host / "var" / "lib" / "hotrestart" / "checkpoints"))
    old = make_checkpoint(store, tmp_path, created=time.time() - 7200)
    said: list[str] = []
    s = settings.Settings(host_root=str(host), retention_max_age=3600.0)
    upkeep.prune(s, said.append)
    assert said == [f"prune: removed checkpoints {old}"]
    assert [e.id for e in store.entries()] == []
    said.clear()
    upkeep.prune(s, said.append)
    assert said == []
    # A link where the store's folder should be: reported, not followed.
    (host / "var" / "lib" / "hotrestart").rename(tmp_path / "moved")
    (host / "var" / "lib" / "hotrestart").symlink_to(tmp_path / "moved")
    upkeep.prune(s, said.append)
    assert said == ["prune: failed: /var/lib/hotrestart is a symbolic link, not a folder: refusing to go through it"]
