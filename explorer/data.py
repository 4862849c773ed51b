"""Cached access to the build: thin `st.cache_data` / `st.cache_resource` wrappers around
`engine.store` queries — the explorer's only door to the data (no SQL here or in pages).

Every wrapper takes a `Db` key, (path, mtime_ns): a build replaced on disk (builds swap in
atomically) gets a new key, so nothing stale is served. Large read-only arrays (the map) are
cached as resources: handing the same object back costs nothing, whereas `cache_data` would
unpickle 10⁵ points on every rerun.
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

import numpy as np
import streamlit as st

from engine.errors import DataError
from engine.store import FeatureInfo, SAEInfo, Store, open_db
from engine.store.notes import Notes, notes_path

Db = tuple[str, int]
"""(absolute path, mtime_ns) of a build file: the cache key of everything read from it."""

ENV_VAR = "MOESAE_DB"


def db_path_from_argv(argv: list[str] | None = None) -> str | None:
    """`--db FILE` from the app's own arguments (after `--` on the streamlit command line),
    else $MOESAE_DB; None when neither is given."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--db" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--db="):
            return arg.split("=", 1)[1]
    return os.environ.get(ENV_VAR) or None


def db_key(path: str) -> Db:
    """The cache key of a build; DataError (one sentence) when the file is missing."""
    p = Path(path).expanduser().resolve()
    try:
        return (str(p), p.stat().st_mtime_ns)
    except OSError:
        raise DataError(f"No build file at {p}; create one with `moesae build`.") from None


@st.cache_resource(show_spinner=False, max_entries=4)
def store(db: Db) -> Store:
    """One read-only connection per build (thread-safe; each query opens its own cursor)."""
    return open_db(db[0])


# -- builds and SAEs ----------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def list_saes(db: Db) -> list[dict]:
    return store(db).list_saes()


@st.cache_data(show_spinner=False)
def sae_info(db: Db, sae: str) -> SAEInfo | None:
    return store(db).sae_info(sae)


@st.cache_data(show_spinner=False)
def domains(db: Db) -> list[str]:
    return store(db).domains()


@st.cache_data(show_spinner=False)
def models(db: Db) -> list[dict]:
    return store(db).models()


# -- experts ------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def experts(db: Db, sae: str) -> list[dict]:
    return store(db).experts(sae)


@st.cache_data(show_spinner=False)
def expert_domain_load(db: Db, sae: str) -> list[dict]:
    return store(db).expert_domain_load(sae)


@st.cache_data(show_spinner=False)
def expert_similarity(db: Db, sae: str) -> np.ndarray:
    return store(db).expert_similarity(sae)


@st.cache_data(show_spinner=False)
def expert_top_features(db: Db, sae: str, expert: int, limit: int = 20) -> list[dict]:
    return store(db).expert_top_features(sae, expert, limit)


@st.cache_data(show_spinner=False)
def expert_top_tokens(db: Db, sae: str, expert: int, limit: int = 20) -> list[dict]:
    return store(db).expert_top_tokens(sae, expert, limit)


@st.cache_data(show_spinner=False)
def sample_contexts(db: Db, sae: str, n: int = 20, domain: str | None = None, seed: int = 0) -> list[dict]:
    return store(db).sample_contexts(sae, n=n, domain=domain, seed=seed)


@st.cache_data(show_spinner=False)
def context_routing(db: Db, sae: str, context_id: int) -> list[dict]:
    return store(db).context_routing(sae, context_id)


# -- features -----------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=2000)
def feature(db: Db, sae: str, f: int) -> FeatureInfo | None:
    return store(db).feature(sae, f)


@st.cache_data(show_spinner=False, max_entries=2000)
def feature_examples(db: Db, sae: str, f: int, limit: int = 20) -> list[dict]:
    return store(db).feature_examples(sae, f, kind="top", limit=limit)


@st.cache_data(show_spinner=False, max_entries=2000)
def quantile_bands(db: Db, sae: str, f: int) -> list[dict]:
    return store(db).quantile_bands(sae, f, with_examples=True)


@st.cache_data(show_spinner=False, max_entries=500)
def search_features(db: Db, sae: str, text: str, limit: int = 50) -> list[dict]:
    return store(db).search_features(sae, text, limit=limit)


@st.cache_resource(show_spinner=False, max_entries=8)
def map_points(db: Db, sae: str) -> dict[str, np.ndarray]:
    """Every feature's map position and colouring columns, plus integer codes for the
    categorical colourings and the hover text, computed once per build."""
    pts = dict(store(db).map_points(sae))
    n = len(pts.get("feature", []))
    doms = np.asarray(pts.get("preferred_domain", np.array([], dtype=object)), dtype=object)
    names = sorted({str(d) for d in doms if d is not None})
    index = {d: i for i, d in enumerate(names)}
    pts["domain_code"] = np.array([index.get(str(d), len(names)) if d is not None else len(names)
                                   for d in doms], dtype=np.int64)
    pts["domain_names"] = np.array([*names, "none"], dtype=object)
    dens = np.asarray(pts.get("density", np.zeros(n)), dtype=np.float64)
    pts["log_density"] = np.log10(np.clip(np.nan_to_num(dens), 1e-7, None)).astype(np.float32)
    tops = pts.get("top_tokens", np.array([], dtype=object))
    moe = len(np.unique(pts.get("expert", []))) > 1
    pts["hover"] = np.array(
        [(f"expert {int(e)}<br>" if moe else "")
         + (("top: " + html.escape(str(t), quote=False)) if t else "never fires")
         for t, e in zip(tops, pts.get("expert", np.zeros(n, np.int64)), strict=True)], dtype=object
    )
    pts["row_of"] = {int(f): i for i, f in enumerate(pts.get("feature", []))}
    for v in pts.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    return pts


@st.cache_resource(show_spinner=False, max_entries=8)
def max_cos_distribution(db: Db, sae: str) -> dict[str, np.ndarray]:
    out = dict(store(db).max_cos_distribution(sae))
    for v in out.values():
        v.setflags(write=False)
    return out


@st.cache_data(show_spinner=False, max_entries=200)
def duplicate_pairs(db: Db, sae: str, threshold: float, limit: int = 500, scope: str = "all") -> list[dict]:
    return store(db).duplicate_pairs(sae, threshold=threshold, limit=limit, scope=scope)


@st.cache_data(show_spinner=False, max_entries=50)
def pair_cos_range(db: Db, sae: str) -> tuple[float, float] | None:
    return store(db).pair_cos_range(sae)


@st.cache_data(show_spinner=False)
def training_log(db: Db, sae: str) -> list[dict]:
    return store(db).training_log(sae)


# -- two SAEs -----------------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def comparisons(db: Db, sae: str) -> list[str]:
    return store(db).comparisons(sae)


@st.cache_data(show_spinner=False, max_entries=200)
def feature_matches(db: Db, sae: str, other: str, order: str = "unmatched", limit: int = 50,
                    expert: int | None = None) -> list[dict]:
    return store(db).feature_matches(sae, other, order=order, limit=limit, expert=expert)


@st.cache_data(show_spinner=False, max_entries=2000)
def match_of(db: Db, sae: str, other: str, f: int) -> dict | None:
    return store(db).match_of(sae, other, f)


@st.cache_resource(show_spinner=False, max_entries=8)
def match_cos(db: Db, sae: str, other: str) -> dict[str, np.ndarray]:
    out = dict(store(db).match_cos(sae, other))
    for v in out.values():
        v.setflags(write=False)
    return out


@st.cache_data(show_spinner=False, max_entries=20)
def expert_matches(db: Db, sae: str, other: str) -> tuple[np.ndarray, np.ndarray]:
    return store(db).expert_matches(sae, other)


# -- text ---------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=200)
def search_contexts(db: Db, text: str, limit: int = 20) -> list[dict]:
    return store(db).search_contexts(text, limit=limit)


@st.cache_data(show_spinner=False, max_entries=500)
def context_codes(db: Db, sae: str, context_id: int) -> list[list[tuple[int, float]]]:
    return store(db).context_codes(sae, context_id)


@st.cache_data(show_spinner=False, max_entries=200)
def contexts_codes(db: Db, sae: str, context_ids: tuple[int, ...]) -> dict[int, list]:
    return store(db).contexts_codes(sae, list(context_ids))


@st.cache_data(show_spinner=False, max_entries=500)
def context(db: Db, context_id: int) -> dict | None:
    return store(db).context(context_id)


@st.cache_resource(show_spinner=False, max_entries=8)
def top_tokens_of(db: Db, sae: str) -> dict[int, str]:
    """feature → its top tokens (what tables show beside a feature id). A resource: pages call
    it for every feature they name, and unpickling 10⁵ entries each time would cost ~50 ms."""
    pts = map_points(db, sae)
    return {int(f): str(t or "") for f, t in zip(pts.get("feature", []), pts.get("top_tokens", []),
                                                  strict=True)}


# -- notes: written while exploring, so read through a key that changes with the file ------------
def notes(db: Db) -> Notes:
    """The build's notes file (labels, notes, explanations), beside it."""
    return Notes(db[0], build_hash=store(db).build_hash())


def notes_version(db: Db) -> int:
    """Changes whenever the notes file does (its mtime), to key the cached reads."""
    try:
        return notes_path(db[0]).stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=50)
def _labels(db: Db, sae: str, version: int) -> dict[int, str]:
    return notes(db).labels(sae)


def labels(db: Db, sae: str) -> dict[int, str]:
    """feature → its label (or explanation), for every labelled feature of `sae`."""
    try:
        return _labels(db, sae, notes_version(db))
    except DataError:
        return {}


def feature_name(db: Db, sae: str, f: int, with_tokens: bool = True) -> str:
    """'feature 12 · “label” · top tokens' — how tables and links name a feature."""
    parts = [f"feature {int(f)}"]
    label = labels(db, sae).get(int(f))
    if label:
        parts.append(f"“{label}”")
    if with_tokens:
        tops = top_tokens_of(db, sae).get(int(f))
        if tops:
            parts.append(tops)
    return " · ".join(parts)
