"""A researcher's labels, notes and explanations of features: `<db>.notes.duckdb` beside the
build.

Why beside and not inside: the build is written once and swapped atomically by a rebuild; the
explorer opens it read-only. Notes are written while exploring (and by `moesae explain`), and
they must survive a rebuild of the same path, so they live in their own small file keyed by
(SAE name, feature). Each row records the build hash it was written against, so a page can say
when a note predates the SAE it is shown on.

Notes are the user's own data, unlike the steering cache: a write that cannot get the file
(another process is writing it) is retried for a few seconds and then refused with one
sentence — never dropped silently.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import duckdb

from ..errors import DataError

NOTES_SCHEMA = (
    "sae VARCHAR, feature INTEGER, label VARCHAR, note VARCHAR, explanation VARCHAR,"
    " explained_by VARCHAR, build VARCHAR, updated TIMESTAMP, PRIMARY KEY (sae, feature)"
)
COLUMNS = ("sae", "feature", "label", "note", "explanation", "explained_by", "build", "updated")
LABEL_CHARS = 80
"""A label is a short name shown beside the feature id everywhere; longer text is a note."""


def notes_path(db_path: str | os.PathLike) -> Path:
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".notes.duckdb")


class Notes:
    """Read and write the notes file of one build (see the module docstring)."""

    def __init__(self, db_path: str | os.PathLike, build_hash: str | None = None, retry_s: float = 5.0):
        self.path = notes_path(db_path)
        self.build_hash = build_hash
        self.retry_s = retry_s
        self._lock = threading.Lock()

    # -- connection ---------------------------------------------------------------------------
    def _connect(self, write: bool) -> duckdb.DuckDBPyConnection | None:
        """A connection, or None when reading a file that does not exist yet."""
        if not write and not self.path.exists():
            return None
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                con = duckdb.connect(str(self.path))
                con.execute(f"CREATE TABLE IF NOT EXISTS notes ({NOTES_SCHEMA})")
                return con
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():  # not a DuckDB file, unreadable …
                    raise DataError(f"{self.path} is not a notes file this version can read; "
                                    "move it aside to start a new one.") from exc
                if time.monotonic() > deadline:  # another process holds the file
                    if not write:
                        return None
                    raise DataError(f"The notes file {self.path} is in use by another process; "
                                    "try again in a moment.") from exc
                time.sleep(0.1)
            except duckdb.Error as exc:
                raise DataError(f"{self.path} is not a notes file this version can read; "
                                "move it aside to start a new one.") from exc

    def _rows(self, sql: str, params: list) -> list[dict]:
        with self._lock:
            con = self._connect(write=False)
            if con is None:
                return []
            try:
                cur = con.execute(sql, params)
                names = [d[0] for d in cur.description]
                return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            finally:
                con.close()

    # -- reading ------------------------------------------------------------------------------
    def get(self, sae: str, feature: int) -> dict | None:
        """The row of one feature (label, note, explanation, explained_by, build, updated,
        `stale`: written against another build), or None."""
        rows = self._rows("SELECT * FROM notes WHERE sae = ? AND feature = ?", [sae, int(feature)])
        if not rows:
            return None
        r = rows[0]
        r["stale"] = bool(self.build_hash and r["build"] and r["build"] != self.build_hash)
        return r

    def labels(self, sae: str) -> dict[int, str]:
        """feature → its label, or failing that the first line of its explanation."""
        rows = self._rows("SELECT feature, coalesce(nullif(label, ''), explanation) AS text FROM notes"
                          " WHERE sae = ? AND coalesce(nullif(label, ''), explanation, '') <> ''", [sae])
        return {int(r["feature"]): short(r["text"]) for r in rows}

    def all(self, sae: str) -> list[dict]:
        return self._rows("SELECT * FROM notes WHERE sae = ? ORDER BY feature", [sae])

    def search(self, sae: str, text: str, limit: int = 50) -> list[dict]:
        """Features whose label, note or explanation contains `text` (any case)."""
        needle = text.strip().lower()
        if not needle:
            return []
        return self._rows(
            "SELECT * FROM notes WHERE sae = ? AND contains(lower(coalesce(label, '') || ' ' ||"
            " coalesce(note, '') || ' ' || coalesce(explanation, '')), ?) ORDER BY feature LIMIT ?",
            [sae, needle, int(limit)])

    # -- writing ------------------------------------------------------------------------------
    def set(self, sae: str, feature: int, *, label: str | None = None, note: str | None = None) -> None:
        """Set the label and/or the note (None keeps what is there; '' clears it)."""
        if label is not None:
            label = " ".join(label.split())
            if len(label) > LABEL_CHARS:
                raise DataError(f"A label is at most {LABEL_CHARS} characters; put longer text in "
                                "the note.")
        self._upsert(sae, feature, {"label": label, "note": note})

    def set_explanation(self, sae: str, feature: int, text: str, by: str) -> None:
        self._upsert(sae, feature, {"explanation": text.strip(), "explained_by": by})

    def _upsert(self, sae: str, feature: int, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return
        with self._lock:
            con = self._connect(write=True)
            try:
                con.execute("INSERT INTO notes (sae, feature) VALUES (?, ?) ON CONFLICT DO NOTHING",
                            [sae, int(feature)])
                sets = ", ".join(f"{k} = ?" for k in values)
                con.execute(f"UPDATE notes SET {sets}, build = ?, updated = now()"
                            " WHERE sae = ? AND feature = ?",
                            [*values.values(), self.build_hash, sae, int(feature)])
                con.execute("DELETE FROM notes WHERE sae = ? AND feature = ? AND coalesce(label, '')"
                            " = '' AND coalesce(note, '') = '' AND coalesce(explanation, '') = ''",
                            [sae, int(feature)])
            finally:
                con.close()


def short(text: str | None, limit: int = LABEL_CHARS) -> str:
    """The first line of `text`, cut at a word to at most `limit` characters."""
    line = (text or "").strip().split("\n", 1)[0].strip()
    if len(line) <= limit:
        return line
    cut = line[: limit - 1].rsplit(" ", 1)[0]
    return cut + "…"
