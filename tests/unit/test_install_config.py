"""The installer's edits of containerd's configuration: the version, the drop-in, the one import."""

from __future__ import annotations

import tomllib

import pytest

from hotrestart.install import config_edit, toml_text
from hotrestart.install import containerd_config as cc
from hotrestart.install.errors import InstallError
from hotrestart.node_config import SHIM_TYPE, path_match, registered

MAIN = "/etc/containerd/config.toml"
RUNTIME = cc.Runtime(
    name="hot",
    install_dir="/opt/hotrestart",
    store="/var/lib/hotrestart/checkpoints",
    store_key="/etc/hotrestart/store-key",
    systemd_cgroup=True,
)
DROPIN = "/etc/containerd/conf.d/hotrestart.toml"


def add(text: str | None, version: int = 2) -> str | None:
    return config_edit.add_import(text, DROPIN, version=version, config_path=MAIN)


def remove(text: str) -> str | None:
    return config_edit.remove_import(text, DROPIN, config_path=MAIN)


def test_the_version_comes_from_the_file_or_from_containerd() -> None:
    assert cc.version_of("version = 2\n", MAIN) == 2
    assert cc.version_of("# hi\nversion = 3 # three\n[plugins]\n", MAIN) == 3
    with pytest.raises(InstallError, match="config version 1 is not supported"):
        cc.version_of("[plugins.cri]\n  x = 1\n", MAIN)
    for other in ("version = 4\n", "version = '2'\n", "version = true\n"):
        with pytest.raises(InstallError, match="is not supported"):
            cc.version_of(other, MAIN)
    with pytest.raises(InstallError, match="not valid TOML"):
        cc.version_of("version = \n", MAIN)
    assert cc.containerd_major("containerd github.com/containerd/containerd/v2 v2.1.9 abc\n") == 2
    assert cc.containerd_major("containerd github.com/containerd/containerd/v2 2.1.9+unknown \n") == 2
    assert cc.containerd_major("containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6\n") == 1
    assert (cc.version_for_containerd(2), cc.version_for_containerd(1)) == (3, 2)
    with pytest.raises(InstallError, match="cannot tell containerd's version"):
        cc.containerd_major("containerd: not found")


@pytest.mark.parametrize(("version", "plugin"), [(2, "io.containerd.grpc.v1.cri"), (3, "io.containerd.cri.v1.runtime")])
def test_the_dropin_registers_the_runtime(version: int, plugin: str) -> None:
    text = cc.render_dropin(version, RUNTIME)
    parsed = tomllib.loads(text)
    assert parsed["version"] == version
    runtime = parsed["plugins"][plugin]["containerd"]["runtimes"]["hot"]
    assert runtime == {
        "runtime_type": SHIM_TYPE,
        "runtime_path": "/opt/hotrestart/current/bin/containerd-shim-hotrestart-v2",
        "pod_annotations": ["hotrestart.io/*"],
        "options": {
            "BinaryName": "runc",
            "SystemdCgroup": True,
            "CheckpointStore": "/var/lib/hotrestart/checkpoints",
            "StoreKeyFile": "/etc/hotrestart/store-key",
        },
    }
    found = registered(parsed)["hot"]
    assert found.options.store_key_file == "/etc/hotrestart/store-key" and found.options.systemd_cgroup
    without_key = cc.render_dropin(version, cc.Runtime("hot", "/o", "/s", "", systemd_cgroup=False))
    options = tomllib.loads(without_key)["plugins"][plugin]["containerd"]["runtimes"]["hot"]["options"]
    assert "StoreKeyFile" not in options and options["SystemdCgroup"] is False


def test_paths_are_quoted_as_toml_strings() -> None:
    odd = 'a "quoted" \\ path\twith\x7fcontrols'
    assert tomllib.loads(f"v = {toml_text.toml_string(odd)}")["v"] == odd


def test_no_main_file_gets_one_with_the_version_and_the_import() -> None:
    assert add(None, 3) == f'version = 3\nimports = ["{DROPIN}"]\n'


def test_the_import_goes_right_after_the_version_line() -> None:
    original = '# the admin\'s\nversion = 2 # two\nroot = "/var/lib/containerd"\n\n[plugins."x"]\n  a = [1,\n    2]\n'
    edited = add(original)
    assert edited == original.replace("# two\n", f'# two\nimports = ["{DROPIN}"]\n')
    assert remove(edited or "") == original


def test_an_import_is_added_to_a_one_line_array() -> None:
    original = 'version = 2\nimports = ["/etc/containerd/a.toml"]  # theirs\n[plugins]\n'
    edited = add(original)
    assert edited == original.replace('a.toml"]', f'a.toml", "{DROPIN}"]')
    assert remove(edited or "") == original
    assert add("version = 2\nimports = []\n") == f'version = 2\nimports = ["{DROPIN}"]\n'
    trailing = add("version = 2\nimports = ['/a.toml',]\n")
    assert trailing is not None and tomllib.loads(trailing)["imports"] == ["/a.toml", DROPIN]


def test_the_imports_line_stays_when_asked() -> None:
    only_ours = f'version = 3\nimports = ["{DROPIN}"]\n[plugins]\n'
    assert remove(only_ours) == "version = 3\n[plugins]\n"
    kept = config_edit.remove_import(only_ours, DROPIN, config_path=MAIN, keep_line=True)
    assert kept == "version = 3\nimports = []\n[plugins]\n"


def test_an_import_is_added_to_an_array_over_several_lines() -> None:
    original = (
        "version = 3\n"
        "imports = [\n"
        '    "/etc/containerd/a.toml",  # a comment\n'
        "    '/etc/containerd/b.toml'\n"
        "]\n"
        "[plugins]\n"
    )
    edited = add(original, 3)
    assert edited == original.replace("b.toml'\n]", f'b.toml\',\n    "{DROPIN}"\n]'), (
        "the admin's lines untouched but for a comma; ours like theirs, with no trailing comma"
    )
    assert tomllib.loads(edited or "")["imports"] == ["/etc/containerd/a.toml", "/etc/containerd/b.toml", DROPIN]
    assert remove(edited or "") == original, "byte for byte"
    trailing = original.replace("b.toml'\n]", "b.toml',\n]")
    edited = add(trailing, 3)
    assert edited == trailing.replace("b.toml',\n]", f'b.toml\',\n    "{DROPIN}",\n]')
    assert remove(edited or "") == trailing, "byte for byte"


def test_an_array_over_several_lines_comes_back_with_its_comments_and_line_endings() -> None:
    for original in (
        "version = 3\nimports = [\n  'a' # c\n]\n",
        "version = 3\r\nimports = [\r\n  'a'\r\n]\r\n",
        "version = 3\r\nimports = [\r\n  'a' # c\r\n]\r\n",
        "version = 3\nimports = [ # why\n  'a', # c\n  'b' # d\n  ]\n",
    ):
        edited = add(original, 3)
        assert edited is not None and tomllib.loads(edited)["imports"][-1] == DROPIN
        assert ("\r\n" in original) == ('hotrestart.toml"\r\n' in edited), "ours ends its line as theirs do"
        assert remove(edited) == original, original


def test_a_file_without_a_final_newline_comes_back_without_one() -> None:
    for original in ("version = 2", 'version = 2\nimports = ["/a.toml"]', "version = 2\n[plugins]\n  x = 1"):
        edited = add(original)
        assert edited is not None and tomllib.loads(edited)["imports"][-1] == DROPIN
        assert remove(edited) == original, original
        block = config_edit.add_block(original, BLOCK, version=2, config_path=MAIN)
        assert block is not None and block.startswith(original + "\n" + BLOCK[:10])
        assert config_edit.remove_block(block, config_path=MAIN) == original, original
        again = config_edit.add_block(block, BLOCK, version=2, config_path=MAIN)
        assert again is None, "there already"


def test_an_import_that_covers_the_dropin_is_enough() -> None:
    for covering in (DROPIN, "/etc/containerd/conf.d/*.toml", "conf.d/*.toml", "/etc/containerd/conf.d/hot*"):
        assert add(f'version = 2\nimports = ["{covering}"]\n') is None, covering
    # `*` stops at "/", as containerd's glob does.
    assert add('version = 2\nimports = ["/etc/containerd/*.toml"]\n') is not None


def test_an_edit_it_cannot_make_exactly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InstallError, match="not a list of paths"):
        add('version = 2\nimports = "/a.toml"\n')
    with pytest.raises(InstallError, match="cannot find its top-level `version"):
        add('"vers\\u0069on" = 2\n')
    with pytest.raises(InstallError, match="cannot find its top-level `imports`"):
        add('version = 2\n"imp\\u006frts" = ["/a.toml"]\n')
    # Whatever the edit, tomllib must read exactly one entry more, or nothing is written.
    monkeypatch.setattr(toml_text, "append_entry", lambda text, array, entry: text + "x = 1\n")
    with pytest.raises(InstallError, match="would change more than that"):
        add('version = 2\nimports = ["/a.toml"]\n')


def test_removing_the_import_when_the_admin_changed_the_file() -> None:
    installed = add("version = 2\n[plugins]\n  x = 1\n")
    assert installed is not None
    changed = installed + "[metrics]\n  address = '127.0.0.1:1338'\n"
    back = remove(changed)
    assert back == "version = 2\n[plugins]\n  x = 1\n[metrics]\n  address = '127.0.0.1:1338'\n"
    assert remove(back) is None, "nothing of ours left"
    many = f'version = 2\nimports = ["/a.toml", "{DROPIN}", "/b.toml", "{DROPIN}"]\n'
    assert remove(many) == 'version = 2\nimports = ["/a.toml", "/b.toml"]\n'
    first = f'version = 2\nimports = [\n  "{DROPIN}",\n  "/a.toml",\n]\n'
    assert remove(first) == 'version = 2\nimports = [\n  "/a.toml",\n]\n'
    glob = 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
    assert remove(glob) is None, "the admin's glob is theirs"


def test_globs_match_as_containerd_matches_them() -> None:
    assert path_match("hotrestart.io/*", "hotrestart.io/checkpoint")
    assert not path_match("*", "hotrestart.io/checkpoint"), "Go's path.Match: * stops at /"
    assert path_match("*", "hotrestart.io")
    assert path_match("hotrestart.io/snap?hot", "hotrestart.io/snapshot")
    assert path_match("hotrestart.io/[a-c]*", "hotrestart.io/checkpoint")
    assert not path_match("hotrestart.io/[^a-c]*", "hotrestart.io/checkpoint")
    assert path_match("a\\*b", "a*b") and not path_match("a\\*b", "axb")
    for bad in ("[", "a[", "[]a]", "[a-]", "x\\"):
        assert not path_match(bad, "a"), bad


def test_the_runc_runtime_says_which_cgroup_driver() -> None:
    v2 = tomllib.loads(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\nSystemdCgroup = true\n'
    )
    assert cc.runc_systemd_cgroup(v2) is True
    v3 = tomllib.loads("version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\nx = 1\n")
    assert cc.runc_systemd_cgroup(v3) is None
    assert cc.runc_systemd_cgroup({}) is None


BLOCK = cc.render_block(RUNTIME, {})


def test_containerd_1_7_gets_a_block_at_the_end_of_the_main_file() -> None:
    original = 'version = 2\n\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "x"\n'
    edited = config_edit.add_block(original, BLOCK, version=2, config_path=MAIN)
    assert edited == original + "\n" + BLOCK
    assert edited.startswith(original), "the admin's text untouched"
    runtimes = tomllib.loads(edited)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert set(runtimes) == {"runc", "hot"}
    assert config_edit.add_block(edited, BLOCK, version=2, config_path=MAIN) is None, "there already"
    assert config_edit.remove_block(edited, config_path=MAIN) == original
    assert config_edit.remove_block(original, config_path=MAIN) is None
    # Other settings: the block is replaced where it is, the admin's lines after it kept.
    later = edited + "[metrics]\n  address = ':1338'\n"
    other = cc.render_block(cc.Runtime("hot", "/opt/hotrestart", "/srv/store", "", systemd_cgroup=False), {})
    changed = config_edit.add_block(later, other, version=2, config_path=MAIN)
    assert changed == original + "\n" + other + "[metrics]\n  address = ':1338'\n"
    assert config_edit.add_block(None, BLOCK, version=2, config_path=MAIN) == "version = 2\n\n" + BLOCK


def test_a_block_over_the_admins_own_runtime_is_refused() -> None:
    theirs = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hot]\n  runtime_type = "x"\n'
    with pytest.raises(InstallError, match="sets 'runtime_type' already: refusing to add ours over it"):
        config_edit.add_block(theirs, BLOCK, version=2, config_path=MAIN)
    inline = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\nruntimes = {}\n'
    with pytest.raises(InstallError, match="would not be valid TOML"):
        config_edit.add_block(inline, BLOCK, version=2, config_path=MAIN)


def test_default_runtimes_are_written_out_with_ours() -> None:
    """containerd 1.7 replaces its default runtimes with a `runtimes` table of the file's own."""
    runc = {
        "runtime_type": "io.containerd.runc.v2",
        "sandbox_mode": "podsandbox",
        "pod_annotations": [],
        "runtime_path": "",
        "privileged_without_host_devices": False,
        "options": {"BinaryName": "", "SystemdCgroup": False, "IoUid": 0},
    }
    merged = {"plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"runtimes": {"runc": runc, "hot": {}}}}}}
    kept = cc.default_runtimes({}, merged, "hot")
    assert kept == {"runc": runc}
    block = cc.render_block(RUNTIME, kept)
    runtimes = tomllib.loads(block)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["runc"] == {"runtime_type": "io.containerd.runc.v2", "sandbox_mode": "podsandbox"}
    own = {"plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"runtimes": {"runc": {}}}}}}
    assert cc.default_runtimes(own, merged, "hot") == {}, "the file's own runtimes are kept by containerd"


def test_differences_in_the_merged_view_other_than_ours() -> None:
    runc = {"runtime_type": "io.containerd.runc.v2"}
    before = {"imports": ["/a"], "plugins": {"cri": {"sandbox": "p:1", "containerd": {"runtimes": {"runc": runc}}}}}
    after = {
        "imports": ["/a", "/b"],
        "plugins": {"cri": {"sandbox": "p:1", "containerd": {"runtimes": {"runc": runc, "hot": {"x": 1}}}}},
    }
    assert cc.differences(before, after, "hot") == []
    lost = {"plugins": {"cri": {"sandbox": "p:2", "containerd": {"runtimes": {"hot": {}}}}}}
    assert cc.differences(before, lost, "hot") == [
        "/plugins/cri/containerd/runtimes/runc/runtime_type",
        "/plugins/cri/sandbox",
    ]
    assert cc.differences({"a": {}}, {}, "hot") == [], "an empty table is no table"
