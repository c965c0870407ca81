"""Hot-restart policy from annotations, compatibility, and the rootfs diff."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hotrestart.checkpoint import rootfs
from hotrestart.checkpoint.compat import incompatibility, spec_digest
from hotrestart.checkpoint.policy import parse_duration, policy_for
from hotrestart.errors import InvalidArgumentError
from hotrestart.store.manifest import Identity, Manifest


def spec(**annotations: str) -> dict[str, Any]:
    base = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-namespace": "ns",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": "example/app:1",
    }
    base.update(annotations)
    return {"annotations": base, "process": {"args": ["app", "--serve"], "env": ["A=1"], "cwd": "/"}}


def test_defaults_and_annotations() -> None:
    p = policy_for(spec())
    assert p.enabled and p.identity.canonical() == "ns/web-0/app" and p.timeout == 10 and p.tcp == "close"
    p = policy_for(
        spec(
            **{
                "hotrestart.io/checkpoint-timeout": "2m",
                "hotrestart.io/tcp": "keep",
                "hotrestart.io/carry-volumes": "data, cache",
                "hotrestart.io/identity": "db-primary",
                "hotrestart.io/checkpoint-interval": "10m",
                "hotrestart.io/gpu-lock-timeout": "2m",
            }
        )
    )
    assert (p.timeout, p.tcp, p.carry_volumes, p.identity.canonical()) == (
        120,
        "keep",
        ("data", "cache"),
        "ns//db-primary",
    )
    assert p.interval == 600 and policy_for(spec()).interval == 0
    assert p.gpu_lock_timeout == 120 and policy_for(spec()).gpu_lock_timeout == 10


def test_sandbox_and_opt_out_are_passed_through() -> None:
    assert not policy_for(spec(**{"io.kubernetes.cri.container-type": "sandbox"})).enabled
    assert not policy_for(spec(**{"hotrestart.io/checkpoint": "off"})).enabled
    assert not policy_for({"annotations": {"io.kubernetes.cri.container-type": "container"}}).enabled


@pytest.mark.parametrize(
    "bad",
    [
        {"hotrestart.io/tcp": "sometimes"},
        {"hotrestart.io/checkpoint-timeout": "soon"},
        {"hotrestart.io/checkpoint-interval": "200ms"},
        {"hotrestart.io/checkpoint-interval": "hourly"},
    ],
)
def test_bad_annotations_are_clear_errors(bad: dict[str, str]) -> None:
    with pytest.raises(InvalidArgumentError):
        policy_for(spec(**bad))


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5 and parse_duration("10") == 10 and parse_duration("1h") == 3600


def manifest_for(s: dict[str, Any], criu: str = "4.2") -> Manifest:
    return Manifest(
        id="x",
        identity=Identity("ns", "web-0", "app"),
        created_at=0,
        node="n",
        reason="stop",
        image=s["annotations"]["io.kubernetes.cri.image-name"],
        spec_digest=spec_digest(s),
        runtime={"criu": criu},
        network={},
        files=[],
        timings={},
    )


def test_compatibility() -> None:
    s = spec()
    m = manifest_for(s)
    here = {"criu": "4.2"}
    assert incompatibility(m, s, here) == ""
    changed = spec(**{"io.kubernetes.cri.image-name": "example/app:2"})
    assert "image" in incompatibility(m, changed, here)
    other_args = spec()
    other_args["process"]["args"] = ["app", "--other"]
    assert "command" in incompatibility(m, other_args, here)
    assert "older" in incompatibility(manifest_for(s, "5.0"), s, here)
    assert "not available" in incompatibility(m, s, {"criu": ""})
    # Resources and mounts are not part of the fingerprint: they come from the live spec.
    more = spec()
    more["mounts"] = [{"destination": "/data"}]
    more["linux"] = {"resources": {"memory": {"limit": 1}}}
    assert incompatibility(m, more, here) == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot and whiteouts need root")
def test_rootfs_diff_replays_files_deletions_and_opaque_dirs(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "new.conf").write_text("v2\n")
    os.mknod(upper / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # overlay whiteout
    (upper / "cache").mkdir()
    os.setxattr(upper / "cache", "trusted.overlay.opaque", b"y")
    (upper / "cache" / "fresh").write_text("x")
    os.symlink("/etc/new.conf", upper / "link")
    target = tmp_path / "merged"
    (target / "etc").mkdir(parents=True)
    (target / "etc" / "gone").write_text("old")
    (target / "cache").mkdir()
    (target / "cache" / "stale").write_text("old")
    # An image symlink that would lead out of the root on the host must stay inside.
    (target / "var").symlink_to("/outside")
    (upper / "var").mkdir()
    (upper / "var" / "file").write_text("inside")
    (target / "var").unlink()
    (target / "var").symlink_to("/etc")
    tar = tmp_path / "diff.tar"
    with open(tar, "wb") as f:
        changes = rootfs.capture(str(upper), f, overlay=True)
    assert (changes.whiteouts, changes.opaque) == (["etc/gone"], ["cache"])
    rootfs.apply(str(target), str(tar), rootfs.Changes.from_json(changes.to_json()))
    assert (target / "etc" / "new.conf").read_text() == "v2\n"
    assert not (target / "etc" / "gone").exists()
    assert sorted(os.listdir(target / "cache")) == ["fresh"]
    assert os.readlink(target / "link") == "/etc/new.conf"
    assert not Path("/etc/file").exists(), "extraction followed a symlink out of the root"
    assert (target / "var" / "file").read_text() == "inside"


def test_snapshot_annotations() -> None:
    import signal

    from hotrestart.checkpoint.policy import DEFAULT_SNAPSHOT_TTL, snapshot_for

    assert snapshot_for({}) is None
    assert snapshot_for({"hotrestart.io/snapshot": "off"}) is None
    snap = snapshot_for(
        {
            "hotrestart.io/snapshot": "template",
            "hotrestart.io/snapshot-after": "30s",
            "hotrestart.io/snapshot-marker": "/run/app/warm",
            "hotrestart.io/snapshot-signal": "usr2",
        }
    )
    assert snap is not None
    assert (snap.after, snap.marker, snap.signal, snap.ttl) == (
        30.0,
        "/run/app/warm",
        signal.SIGUSR2,
        DEFAULT_SNAPSHOT_TTL,
    )
    for bad in (
        {"hotrestart.io/snapshot": "always"},
        {"hotrestart.io/snapshot": "template", "hotrestart.io/snapshot-marker": "relative/warm"},
        {"hotrestart.io/snapshot": "template", "hotrestart.io/snapshot-marker": "/run/../etc/shadow"},
        {"hotrestart.io/snapshot": "template", "hotrestart.io/snapshot-signal": "SIGKILL"},
        {"hotrestart.io/snapshot": "template", "hotrestart.io/snapshot-signal": "SIGNOPE"},
    ):
        with pytest.raises(InvalidArgumentError):
            snapshot_for(bad)


def test_skipped_containers_start_fresh_and_the_others_do_not() -> None:
    def spec(container: str) -> dict[str, Any]:
        return {
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-namespace": "shop",
                "io.kubernetes.cri.sandbox-name": "web-0",
                "io.kubernetes.cri.container-name": container,
                "hotrestart.io/skip-containers": " migrate , wait-for-db",
            }
        }

    assert not policy_for(spec("migrate")).enabled
    assert not policy_for(spec("wait-for-db")).enabled
    assert policy_for(spec("app")).enabled
