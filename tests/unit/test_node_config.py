"""The doctor's reading of containerd's configuration: this shim's runtimes and their options."""

from __future__ import annotations

from pathlib import Path

from hotrestart.node_config import SHIM_TYPE, hotrestart_runtimes


def test_runtimes_are_found_in_config_versions_2_and_3(tmp_path: Path) -> None:
    options_file = tmp_path / "hotrestart.toml"
    options_file.write_text("AllowArchiveRestore = true\nStoreKeyFile = '/etc/hotrestart/store-key'\n")
    v2 = {
        "version": 2,
        "plugins": {
            "io.containerd.grpc.v1.cri": {
                "containerd": {
                    "runtimes": {
                        "runc": {"runtime_type": "io.containerd.runc.v2", "options": {"SystemdCgroup": True}},
                        "hotrestart": {"runtime_type": SHIM_TYPE, "options": {}},
                    }
                }
            }
        },
    }
    v3 = {
        "version": 3,
        "plugins": {
            "io.containerd.cri.v1.runtime": {
                "containerd": {
                    "runtimes": {
                        "hot-gpu": {"runtime_type": SHIM_TYPE, "options": {"ConfigPath": str(options_file)}},
                        "hot-lax": {
                            "runtime_type": SHIM_TYPE,
                            "options": {"AllowArchiveRestore": True, "AllowUnauthenticatedArchives": True},
                        },
                    }
                }
            }
        },
    }
    assert set(hotrestart_runtimes(v2)) == {"hotrestart"}
    assert not hotrestart_runtimes(v2)["hotrestart"].allow_archive_restore
    found = hotrestart_runtimes(v3)
    assert found["hot-gpu"].allow_archive_restore and found["hot-gpu"].store_key_file == "/etc/hotrestart/store-key"
    assert found["hot-lax"].allow_unauthenticated_archives
