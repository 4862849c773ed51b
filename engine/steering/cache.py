"""Steering results are cached by a key of everything that determines them, in the sidecar
file beside the build (engine.store.SteeringCache): the explorer holds the build itself
read-only and DuckDB allows one writer per file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from .run import SteerResult
from .spec import SteerSpec

if TYPE_CHECKING:
    from ..store import SteeringCache

CACHE_VERSION = 1
"""Bump when the meaning of a cached payload changes, so old entries are never served."""


def spec_key(model: str, sae_id: str, prompt: str, spec: SteerSpec) -> str:
    """sha256 of the canonical JSON of everything that determines a result."""
    d = spec.to_dict()
    d["features"] = sorted(d["features"])
    blob = json.dumps(
        {"v": CACHE_VERSION, "model": model, "sae": sae_id, "prompt": prompt, "spec": d},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def result_key(model: str, sae_name: str, sae, prompt: str, spec: SteerSpec) -> str:
    """The cache key of steering `sae` (saved as `sae_name` in a build) on `model`: the SAE's
    weight fingerprint is part of it, so a retrained SAE under the same name never hits an
    old entry."""
    return spec_key(model, f"{sae_name}@{sae.fingerprint()}", prompt, spec)


def cached_steer(
    cache: SteeringCache | None, key: str, compute: Callable[[], SteerResult]
) -> SteerResult:
    """The cached result for `key` when there is one, else `compute()` stored under `key`."""
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return SteerResult.from_dict(hit, cached=True)
    result = compute()
    if cache is not None:
        cache.put(key, result.to_dict())
    return result
