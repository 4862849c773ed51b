"""The steering results cache: a small DuckDB file beside the build."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from .schema import SCHEMA

if TYPE_CHECKING:
    from .reader import Store


class SteeringCache:
    """Key → JSON payload cache for steering results, in `<db>.steer.duckdb` beside the build.

    Why a separate file: DuckDB allows one writing process per file and the explorer holds the
    build read-only (so builds can swap it atomically and several viewers can read it). Steering
    results are produced while exploring, so they go to a small sidecar the explorer may write.
    The build's own `steering_cache` table is for results precomputed at build time; `get`
    looks there first when a Store is given. Each call opens and closes its connection so two
    explorer processes can share the sidecar (a concurrent writer raises → treated as a miss).
    """

    def __init__(self, db_path: str | os.PathLike, store: Store | None = None):
        db_path = Path(db_path)
        self.path = db_path.with_name(db_path.name + ".steer.duckdb")
        self.store = store
        self._lock = threading.Lock()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(str(self.path))
        con.execute(f"CREATE TABLE IF NOT EXISTS steering_cache ({SCHEMA['steering_cache']})")
        return con

    def get(self, key: str) -> Any | None:
        if self.store is not None:
            hit = self.store.steering_payload(key)
            if hit is not None:
                return hit
        if not self.path.exists():
            return None
        with self._lock:
            try:
                con = self._connect()
            except duckdb.Error:
                return None
            try:
                row = con.execute(
                    "SELECT payload FROM steering_cache WHERE key = ?", [key]
                ).fetchone()
            finally:
                con.close()
        return json.loads(row[0]) if row else None

    def put(self, key: str, payload: Any) -> None:
        with self._lock:
            try:
                con = self._connect()
            except duckdb.Error:
                return  # another process holds the sidecar; caching is best effort
            try:
                con.execute(
                    "INSERT OR REPLACE INTO steering_cache VALUES (?, ?, now())",
                    [key, json.dumps(payload)],
                )
            finally:
                con.close()
