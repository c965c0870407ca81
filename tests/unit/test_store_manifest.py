"""Checkpoint manifests: malformed, oversized, non-finite, escaping and newer ones are refused, each with its reason."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from storekit import IDENT, base_manifest, make_checkpoint

from hotrestart.store.manifest import (
    MAX_CHUNK_RAW,
    MAX_MANIFEST,
    SCHEMA,
    Manifest,
    ManifestError,
    UnsupportedManifestError,
)
from hotrestart.store.store import Store


@pytest.mark.parametrize("text", ["", "{}", '{"schema": "other"}', '{"schema": "hotrestart.io/checkpoint/v1"}'])
def test_bad_manifests_are_refused(text: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_manifest_cannot_name_files_outside_the_checkpoint(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    text = entry.manifest.to_json().replace('"images/pages.img.zst"', '"../../etc/shadow"')
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("files not objects", lambda m: m.update(files=[1])),
    ("string chunk size", lambda m: m["files"][0]["chunks"][0].update(stored="100")),
    ("bool count", lambda m: m.update(restore_attempts=True)),
    ("negative size", lambda m: m["files"][0].update(raw_bytes=-1)),
    ("huge size", lambda m: m["files"][0].update(raw_bytes=10**40)),
    ("bad chunk digest", lambda m: m["files"][0]["chunks"][0].update(digest="zz" * 32)),
    ("short chunk digest", lambda m: m["files"][0]["chunks"][0].update(digest="ab" * 16)),
    ("upper-case file digest", lambda m: m["files"][0].update(digest="AB" * 32)),
    ("chunk without digest", lambda m: m["files"][0]["chunks"][0].pop("digest")),
    ("empty chunk", lambda m: m["files"][0]["chunks"][0].update(raw=0)),
    ("chunk larger than written", lambda m: m["files"][0]["chunks"][0].update(raw=MAX_CHUNK_RAW + 1)),
    ("no space", lambda m: m.pop("space")),
    ("space not a key's", lambda m: m.update(space="k-XYZ")),
    ("space a path", lambda m: m.update(space="../plain")),
    ("new_bytes negative", lambda m: m.update(new_bytes=-1)),
    ("absolute path", lambda m: m["files"][0].update(path="/etc/shadow")),
    ("dot-dot path", lambda m: m["files"][0].update(path="images/../../x")),
    ("empty path part", lambda m: m["files"][0].update(path="images//x")),
    ("duplicate file", lambda m: m["files"].append(m["files"][0])),
    ("missing field", lambda m: m.pop("node")),
    ("identity not an object", lambda m: m.update(identity="ns/web-0/app")),
    ("id not safe", lambda m: m.update(id="../c-1")),
    ("string too long", lambda m: m.update(image="x" * 5000)),
    ("control characters", lambda m: m.update(node="n1\x1b[2J")),
    ("runtime not strings", lambda m: m.update(runtime={"criu": 4})),
    ("timing negative", lambda m: m.update(timings={"dump": -1})),
    ("tcp unknown", lambda m: m.update(tcp="maybe")),
    ("created_at a string", lambda m: m.update(created_at="yesterday")),
    ("created_at far ahead", lambda m: m.update(created_at=time.time() + 3 * 86400)),
    ("addresses not a list", lambda m: m.update(network={"addresses": "10.0.0.1"})),
    ("gpu process not an object", lambda m: m.update(gpu={"processes": [1]})),
    ("gpu memory a string", lambda m: m.update(gpu={"processes": [{"memory_used": "1"}]})),
    ("sizes do not add up", lambda m: m["files"][0].update(stored_bytes=99)),
    ("garbage schema", lambda m: m.update(schema="something/else")),
]


@pytest.mark.parametrize("name", [name for name, _ in MALFORMED])
def test_malformed_manifests_are_refused_with_a_reason(name: str) -> None:
    data = json.loads(base_manifest())
    dict(MALFORMED)[name](data)
    with pytest.raises(ManifestError) as refused:
        Manifest.from_json(json.dumps(data))
    assert not isinstance(refused.value, UnsupportedManifestError) and str(refused.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(base_manifest().replace('"created_at": 1000.0', f'"created_at": {literal}'))


def test_oversized_and_deeply_nested_manifests_are_refused() -> None:
    with pytest.raises(ManifestError, match="larger"):
        Manifest.from_json(" " * (MAX_MANIFEST + 1))
    with pytest.raises(ManifestError):
        Manifest.from_json("[" * 100_000 + "]" * 100_000)
    deep = base_manifest().replace('"network": {}', '"network": ' + '{"a": ' * 20 + "1" + "}" * 20)
    with pytest.raises(ManifestError, match="deeply"):
        Manifest.from_json(deep)


def test_newer_schemas_and_fields_are_unsupported_not_corrupt() -> None:
    assert SCHEMA == "hotrestart.io/checkpoint/v2"
    for newer in ("hotrestart.io/checkpoint/v3", "hotrestart.io/checkpoint/v10"):
        with pytest.raises(UnsupportedManifestError):
            Manifest.from_json(base_manifest().replace(SCHEMA, newer))
    data = json.loads(base_manifest())
    data["parent"] = {"id": "x"}
    with pytest.raises(UnsupportedManifestError, match="parent"):
        Manifest.from_json(json.dumps(data))
    data = json.loads(base_manifest())
    data["files"][0]["chunks"][0]["sha256"] = "ab" * 32
    with pytest.raises(UnsupportedManifestError, match="sha256"):
        Manifest.from_json(json.dumps(data))
    parsed = Manifest.from_json(base_manifest())
    assert parsed.files[0].chunks[0].raw == 6000 and parsed.files[0].chunks[0].digest == "ab" * 32
    assert parsed.space == "plain" and parsed.new_bytes == 0


def test_a_manifest_of_the_earlier_schema_is_refused_as_written_by_an_earlier_version() -> None:
    # v1 stored each file whole in the checkpoint's folder: nothing here can restore it, and
    # it is not a newer writer's either (so retention may remove it like a corrupt one).
    data = json.loads(base_manifest())
    data["schema"] = "hotrestart.io/checkpoint/v1"
    with pytest.raises(ManifestError, match="earlier version") as refused:
        Manifest.from_json(json.dumps(data))
    assert not isinstance(refused.value, UnsupportedManifestError)


def test_a_manifest_round_trips_with_its_space_and_new_bytes() -> None:
    manifest = Manifest.from_json(base_manifest())
    manifest.space, manifest.new_bytes = "k-" + "0a" * 12, 1234
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
