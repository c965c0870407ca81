"""What a restore notes beside its checkpoint, and `hotrestart inspect` showing it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from storekit import IDENT, make_checkpoint

from hotrestart.store.restores import MAX_RECORD, Record
from hotrestart.store.store import Store


def test_a_record_round_trips() -> None:
    record = Record("node-a", 1700000000.5, lazy=True, resident_after=4.25)
    assert Record.from_json(record.to_json()) == record
    assert Record.from_json(Record("n", 1.0, lazy=False).to_json()) == Record("n", 1.0, False, None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{",
        b'{"node": 1, "started_at": 1, "lazy": true}',
        b'{"node": "n", "started_at": "1", "lazy": true}',
        b'{"node": "n", "started_at": 1, "lazy": 1}',
        b'{"node": "n", "started_at": 1e999, "lazy": true}',
        b'{"node": "n", "started_at": true, "lazy": true}',
        b'{"node": "n", "started_at": 1, "lazy": true, "resident_after": "soon"}',
        b'{"node": "n", "started_at": NaN, "lazy": true}',
        b"[" * 100000,
        b'{"node": "' + b"x" * MAX_RECORD + b'", "started_at": 1, "lazy": true}',
    ],
)
def test_anything_else_is_no_record(data: bytes) -> None:
    assert Record.from_json(data) is None


def test_the_record_goes_where_its_checkpoint_goes_and_inspect_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hotrestart.cli import main

    store = Store(str(tmp_path / "s"))
    cid = make_checkpoint(store, tmp_path)
    entry = store.latest(IDENT)
    assert entry is not None and store.restore_record(entry) is None
    claimed = store.claim(entry)
    assert claimed is not None and claimed.manifest is not None
    started = time.time()
    store.note_restore(claimed, Record("node-b\x1b[31m", started, lazy=True))
    store.note_restore(claimed, Record("node-b", started, lazy=True, resident_after=3.5))
    released = store.release(claimed, claimed.manifest)
    assert store.restore_record(released) == Record("node-b", started, True, 3.5)
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "inspect", cid])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "restored:  lazy (memory on demand), fully resident after 3.50s, on node-b at " in out
    quarantined = store.quarantine(store.claim(released) or released, "died")
    store.note_restore(quarantined, Record("node-b\x1b[31m", started, lazy=True))
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "inspect", cid])
    out = capsys.readouterr().out
    assert "not fully resident (yet), on node-b?[31m at" in out and "\x1b" not in out
