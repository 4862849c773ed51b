"""The DuckDB build file: schema, atomic writes, typed read queries and the steering sidecar.

The explorer's only door to the data is `Store` (engine.store.reader); it never writes SQL of
its own. Every query is parameterised (`?`), never built from user text.
"""

from .reader import FeatureInfo, SAEInfo, Store, open_db
from .schema import SCHEMA, SCHEMA_VERSION, SORT_ON_CLOSE
from .sidecar import SteeringCache
from .writer import BuildWriter, ragged_list_column

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "SORT_ON_CLOSE",
    "BuildWriter",
    "FeatureInfo",
    "SAEInfo",
    "SteeringCache",
    "Store",
    "open_db",
    "ragged_list_column",
]
