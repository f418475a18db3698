"""Pure helpers: row-count comparison, the journal's privacy, dump selection."""
import json
import stat

import pytest

from drydock import dumps
from drydock.errors import DrydockError
from drydock.journal import Run
from drydock_pg import count_differences


def test_count_differences_names_each_table():
    assert count_differences({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert count_differences({"a": 1, "b": 2, "c": 3}, {"a": 2, "b": 2, "d": 0}) == [
        "a: 2 rows, expected 1", "c: missing", "d: not in the manifest"]


def test_journal_is_private_and_records_failures(tmp_path):
    run = Run("example", root=tmp_path)
    with run.step("fine", bytes=3):
        pass
    with pytest.raises(RuntimeError), run.step("broken"):
        raise RuntimeError("it broke\nsecond line")
    assert stat.S_IMODE(run.dir.stat().st_mode) == 0o700
    journal = run.dir / "journal.jsonl"
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(e["step"], e["outcome"]) for e in entries] == [("fine", "ok"), ("broken", "failed")]
    assert entries[1]["error"] == "it broke"


def make_backup(root, env, stamp, with_dump=True):
    folder = root / env / stamp
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(
        {"source": {"env": env}, "dump": {"sha256": "x", "size": 1}, "row_counts": {"t": 1}, "created": stamp}))
    if with_dump:
        (folder / f"db-{stamp}.dump").write_bytes(b"PGDMP")
    return folder


def test_latest_picks_the_newest_complete_backup(tmp_path):
    make_backup(tmp_path, "production", "20260101T000000Z")
    newest = make_backup(tmp_path, "production", "20260102T000000Z")
    make_backup(tmp_path, "production", "20260103T000000Z", with_dump=False)  # interrupted fetch
    assert dumps.latest("production", root=tmp_path).path.parent == newest


def test_latest_without_backups_says_what_to_do(tmp_path):
    with pytest.raises(DrydockError, match="inv backup staging"):
        dumps.latest("staging", root=tmp_path)


def test_load_requires_a_manifest(tmp_path):
    dump = tmp_path / "x.dump"
    dump.write_bytes(b"PGDMP")
    with pytest.raises(DrydockError, match="no manifest.json"):
        dumps.load(dump)
