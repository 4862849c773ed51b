"""Writing a build: `with BuildWriter(path) as w: w.insert(table, columns)` builds into
`path.tmp-<pid>` and swaps it in with `os.replace` only when the block exits cleanly, so a
reader never sees half a build and a crash leaves the previous file untouched."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from .schema import SCHEMA, SCHEMA_VERSION, SORT_ON_CLOSE


def _to_arrow_column(v: Any) -> pa.Array:
    """numpy 1-D → array; numpy 2-D → list column (one row per row); list of lists → list column."""
    if isinstance(v, pa.Array | pa.ChunkedArray):
        return v
    if isinstance(v, np.ndarray):
        if v.ndim == 2:
            n, w = v.shape
            offsets = (np.arange(n + 1, dtype=np.int64) * w).astype(np.int32 if n * w < 2**31 else np.int64)
            flat = pa.array(np.ascontiguousarray(v).reshape(-1))
            if offsets.dtype == np.int64:
                return pa.LargeListArray.from_arrays(offsets, flat)
            return pa.ListArray.from_arrays(offsets, flat)
        return pa.array(v)
    return pa.array(list(v))


def ragged_list_column(values: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """A list column from one flat array and the length of each row (for variable-length lists)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values)))


class BuildWriter:
    """Writes a complete build into a temporary file and swaps it in only on success.

    `with BuildWriter(path) as w: w.insert("features", {...})`. Columns are numpy arrays
    (2-D arrays become list columns), Python lists, or pyarrow arrays; missing columns are NULL.
    On a clean exit the tables are sorted for fast lookups, the file is checkpointed and
    `os.replace`d over `path` (atomic on one filesystem). On an exception the temporary file
    is deleted and the old `path`, if any, is left exactly as it was.
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.meta = dict(meta or {})
        self.con: duckdb.DuckDBPyConnection | None = None

    def __enter__(self) -> BuildWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_tmp()
        self.con = duckdb.connect(str(self.tmp))
        for name, cols in SCHEMA.items():
            self.con.execute(f"CREATE TABLE {name} ({cols})")
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "duckdb_version": duckdb.__version__,
            **self.meta,
        }
        self.con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        return self

    def insert(self, table: str, columns: Mapping[str, Any] | pa.Table) -> None:
        """Append rows to `table` (a name from SCHEMA); columns are matched by name."""
        if table not in SCHEMA:
            raise ValueError(f"unknown table {table!r}")
        assert self.con is not None, "use BuildWriter as a context manager"
        data = columns if isinstance(columns, pa.Table) else pa.table(
            {k: _to_arrow_column(v) for k, v in columns.items()}
        )
        if data.num_rows == 0:
            return
        self.con.register("_incoming", data)
        try:
            self.con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _incoming")
        finally:
            self.con.unregister("_incoming")

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Escape hatch for the engine (e.g. a row with JSON); parameters only, never f-strings."""
        assert self.con is not None
        self.con.execute(sql, params or [])

    def __exit__(self, exc_type, exc, tb) -> None:
        con, self.con = self.con, None
        if exc_type is not None:
            try:
                con.close()
            finally:
                self._remove_tmp()
            return
        try:
            # derived columns, filled here once for whatever wrote the rows
            con.execute("UPDATE contexts SET lower_text = lower(array_to_string(tokens, ''))"
                        " WHERE lower_text IS NULL")
            for table, order in SORT_ON_CLOSE.items():
                con.execute(f"CREATE TABLE _sorted AS SELECT * FROM {table} ORDER BY {order}")
                con.execute(f"DROP TABLE {table}")
                con.execute(f"ALTER TABLE _sorted RENAME TO {table}")
            con.execute("CHECKPOINT")
            con.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            try:
                con.close()
            finally:
                self._remove_tmp()
            raise

    def _remove_tmp(self) -> None:
        for p in (self.tmp, self.tmp.with_name(self.tmp.name + ".wal")):
            p.unlink(missing_ok=True)
        # and those of builds of this file whose process no longer exists (a kill -9)
        for p in self.path.parent.glob(f"{self.path.name}.tmp-*"):
            pid = p.name[len(self.path.name) + 5 :].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
