"""engine.store.notes: labels, notes and explanations beside a build."""

from __future__ import annotations

import multiprocessing as mp

import duckdb
import pytest

from engine.errors import DataError
from engine.store.notes import Notes, notes_path, short


def test_set_get_clear_and_search(tmp_path):
    db = tmp_path / "b.duckdb"
    n = Notes(db, build_hash="h1")
    assert n.get("s", 3) is None and n.labels("s") == {} and not notes_path(db).exists()
    n.set("s", 3, label="  quote   marks ")
    n.set("s", 3, note="fires on ' inside words")
    n.set_explanation("s", 4, "Bible verse numbers\nsecond line", "tiny-llm")
    r = n.get("s", 3)
    assert (r["label"], r["note"], r["build"], r["stale"]) == ("quote marks", "fires on ' inside words", "h1", False)
    assert n.labels("s") == {3: "quote marks", 4: "Bible verse numbers"}  # label, else explanation
    assert [r["feature"] for r in n.search("s", "VERSE")] == [4]
    assert [r["feature"] for r in n.search("s", "inside")] == [3]
    assert n.search("other", "verse") == [] and n.search("s", "  ") == []
    # None keeps, '' clears; a row with nothing left is removed
    n.set("s", 3, label="")
    assert n.get("s", 3)["note"] == "fires on ' inside words"
    n.set("s", 3, note="")
    assert n.get("s", 3) is None
    # a note written against another build says so
    assert Notes(db, build_hash="h2").get("s", 4)["stale"] is True


def test_long_label_is_one_sentence_and_nothing_is_lost(tmp_path):
    n = Notes(tmp_path / "b.duckdb")
    n.set("s", 1, note="keep me")
    with pytest.raises(DataError, match="at most 80 characters"):
        n.set("s", 1, label="x" * 81)
    assert n.get("s", 1)["note"] == "keep me"
    assert short("word " * 30).endswith("…") and len(short("word " * 30)) <= 80


def _hold(path, ready, release):
    con = duckdb.connect(str(path))
    ready.set()
    release.wait(30)
    con.close()


def test_a_busy_file_is_refused_not_dropped(tmp_path):
    db = tmp_path / "b.duckdb"
    n = Notes(db, retry_s=0.3)
    n.set("s", 1, label="first")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(notes_path(db), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(DataError, match="in use by another process"):
            n.set("s", 1, label="second")
        assert n.get("s", 1) is None or n.get("s", 1)["label"] == "first"  # reads give up quietly
    finally:
        release.set()
        p.join(30)
    assert n.get("s", 1)["label"] == "first"


def test_not_a_notes_file(tmp_path):
    db = tmp_path / "b.duckdb"
    notes_path(db).write_text("hello")
    with pytest.raises(DataError, match="is not a notes file"):
        Notes(db).set("s", 1, label="x")
    assert notes_path(db).read_text() == "hello"
