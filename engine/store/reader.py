"""Reading a build: the typed queries, the explorer's only door to the data.

The explorer's only door to the data is the `Store` class below; it never writes SQL of its
own. Every query is parameterised (`?`), never built from user text.

Query API (what the explorer codes against)
-------------------------------------------
`open_db(path) -> Store` (read-only; `DataError` with one sentence for a missing file, a file
that is not DuckDB, a DuckDB file that is not a moesae build, or another schema version).
Unknown SAE names or feature ids return empty results (`None` / `[]`), never raise.

    store.meta()                 -> dict[str, str]  schema_version, created, build_hash, …
    store.build_hash()           -> str | None
    store.list_saes()            -> list[dict]  sae, arch, model, hook, width, experts, active, k, n_tokens
    store.sae_info(sae)          -> SAEInfo | None  (dataclass: config dict, metrics dict, training_log
                                    list[dict], hist_edges, load_entropy, map_method, n_contexts …)
    store.models()               -> list[dict]  name, hook, d_model, n_layers, info (dict)
    store.domains()              -> list[str]
    store.experts(sae)           -> list[dict]  expert, n_features, n_alive, load_top1, load_topk,
                                    omega (None unless Scale with feature scaling), mean_confidence,
                                    router_entropy (mean H(p)/log N of tokens whose top-1 it is),
                                    domain_entropy, top_tokens (list[{token, count, share}])
    store.expert_domain_load(sae)-> list[dict]  expert, domain, n_tokens, load_top1, load_topk
    store.expert_similarity(sae) -> np.ndarray [N, N] float (METHOD §4; row i = features of expert i)
    store.feature(sae, f)        -> FeatureInfo | None  (stats, histogram, logit effects, neighbours)
    store.feature_examples(sae, f, kind="top"|"band", limit=20)
                                 -> list[dict]  rank, band, context, domain, position, activation,
                                    tokens (list[str] of the whole context), acts (list[float], the
                                    feature's activation at every position of that context)
    store.quantile_bands(sae, f, with_examples=True)
                                 -> list[dict]  band, lo, hi, n, share, examples (as feature_examples)
    store.map_points(sae)        -> dict[str, np.ndarray]  feature, x, y, expert, cluster, density,
                                    max_act, top_tokens (object), preferred_domain (object)
    store.duplicate_pairs(sae, threshold=0.9, limit=500, scope="all"|"within"|"across")
                                 -> list[dict]  a, b, cos, expert_a, expert_b, within,
                                    top_tokens_a, top_tokens_b (highest cosine first)
    store.max_cos_distribution(sae) -> dict  max_cos np.ndarray [M], expert np.ndarray [M]
    store.pair_cos_range(sae)    -> (lowest, highest) stored pair cosine, or None
    store.comparisons(sae)       -> list[str]  SAEs matched with this one feature by feature
    store.feature_matches(sae, other, order="unmatched"|"shared"|"feature", limit=50, expert=None)
                                 -> list[dict]  feature, expert, top_tokens, density, nearest,
                                    nearest_cos, nearest_expert, nearest_top_tokens, partner, partner_cos
    store.match_of(sae, other, f) -> dict | None  nearest, nearest_cos, partner, partner_cos
    store.match_cos(sae, other)  -> dict  nearest_cos, partner_cos, expert arrays (firing features)
    store.expert_matches(sae, other) -> (share [N, N'], mean_cos [N, N'])
    store.search_contexts(text, limit=20) -> list[dict]  context, domain, split, tokens, hits
    store.context_codes(sae, context) -> per position [(feature, activation)], strongest first
                                    (up to 8 per position); contexts_codes(sae, ids) -> {id: …}
    store.search_features(sae, text, limit=50)
                                 -> list[dict]  feature, expert, density, max_act, top_tokens,
                                    matched ("top tokens" | "logits"), most frequent first
    store.context(context_id)    -> dict | None  context, domain, tokens (list[str]), token_ids
    store.context_routing(sae, context_id)
                                 -> list[dict]  position, token, experts (list[int]), weights
                                    (list[float]); empty lists where no routing (dense SAE,
                                    dropped position)
    store.sample_contexts(sae, n=20, domain=None, seed=0)
                                 -> list[dict]  context, domain, text (first 200 chars)
    store.expert_top_features(sae, expert, limit=20) -> list[dict]  feature, n_fires, density,
                                    max_act, top_tokens (most frequently firing first)
    store.expert_top_tokens(sae, expert, limit=20)   -> list[dict]  token, count, share
    store.training_log(sae)      -> list[dict]  one per logged step, as train.py wrote it

    store.steering_payload(key)  -> Any | None  a steering result precomputed at build time

`SteeringCache(db_path)` (engine.store.sidecar) keeps steering results made while exploring in
a file beside the build; `BuildWriter` (engine.store.writer) writes builds.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from ..errors import DataError
from .schema import SCHEMA_VERSION


def open_db(path: str | os.PathLike, read_only: bool = True) -> Store:
    """Open a build for reading; one clear `DataError` sentence when it cannot be used."""
    return Store(path, read_only=read_only)


@dataclass
class SAEInfo:
    name: str
    """Build-local name of the SAE run."""
    arch: str
    model: str
    hook: str
    width: int
    """M: number of features."""
    experts: int
    active: int
    k: int
    config: dict
    """The SAEConfig (and input scale) as saved with the checkpoint."""
    metrics: dict
    """METHOD.md §4 metric name → value (whatever `moesae eval` produced; may be empty)."""
    training_log: list[dict]
    """One dict per logged training step (empty when the SAE was imported)."""
    n_tokens: int
    """Analysis tokens the statistics were computed on."""
    n_contexts: int
    hist_edges: list[float]
    """Shared log-spaced histogram bin edges (len = bins + 1) for every feature of this SAE."""
    load_entropy: float | None
    """Top-1 load entropy / log N (None for dense TopK)."""
    map_method: str
    """'umap' or 'pca' (small SAEs) — how map x, y were made."""
    logit_note: str
    """How logit effects were computed (final-norm handling)."""


@dataclass
class FeatureInfo:
    sae: str
    feature: int
    expert: int
    n_fires: int
    """Analysis tokens on which the feature is non-zero."""
    density: float
    """n_fires / n_tokens."""
    mean_act: float
    """Mean activation over the tokens where it fires (0 if it never fires)."""
    max_act: float
    x: float | None
    y: float | None
    cluster: int | None
    max_cos: float
    """Max decoder cosine to any other feature."""
    top_tokens: str
    """Most frequent tokens among its top examples, ' · '-joined."""
    preferred_domain: str | None
    domain_counts: dict[str, int]
    """Domain → number of firing tokens."""
    hist_counts: list[int]
    hist_edges: list[float]
    """Bin edges for hist_counts (len + 1); bin 0 also holds values below edge 0, the last bin values above."""
    logit_pos: list[tuple[str, float]]
    """Top output tokens promoted by the decoder direction, (token, logit effect)."""
    logit_neg: list[tuple[str, float]]
    neighbours: list[dict] = field(default_factory=list)
    """Nearest by decoder cosine: dicts feature, cos, expert, top_tokens (highest first)."""


class Store:
    """Read-only typed access to one build. Thread-safe: each query runs on its own cursor."""

    def __init__(self, path: str | os.PathLike, read_only: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"No build file at {self.path}; create one with `moesae build`.")
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as e:
            raise DataError(
                f"{self.path} is not a readable DuckDB build file ({_first_line(e)})."
            ) from None
        try:
            tables = {r[0] for r in self._con.execute(
                "SELECT table_name FROM information_schema.tables"
            ).fetchall()}
            if "meta" not in tables:
                raise DataError(
                    f"{self.path} is a DuckDB file but not a MoE-SAE Explorer build; "
                    "create one with `moesae build`."
                )
            row = self._con.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
        except DataError:
            self._con.close()
            raise
        except (duckdb.Error, ValueError) as e:
            self._con.close()
            raise DataError(f"{self.path} looks corrupt ({_first_line(e)}).") from None
        if version != SCHEMA_VERSION:
            self._con.close()
            raise DataError(
                f"This file was built with schema version {version}; this explorer reads "
                f"version {SCHEMA_VERSION} — rebuild it with `moesae build`."
            )
        self.schema_version = version
        self._lock = threading.Lock()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------
    def _cur(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            return self._con.cursor()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        cur = self._cur()
        try:
            res = cur.execute(sql, list(params))
            names = [d[0] for d in res.description]
            return [dict(zip(names, r, strict=True)) for r in res.fetchall()]
        finally:
            cur.close()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def meta(self) -> dict[str, str]:
        """Build metadata: schema_version, created, duckdb_version, build_hash, … (all strings)."""
        return {r["key"]: r["value"] for r in self._rows("SELECT key, value FROM meta")}

    def build_hash(self) -> str | None:
        """The hash of everything the build was made from (set by `analyze(build_hash=...)`)."""
        return self.meta().get("build_hash")

    # -- builds, models, SAEs ----------------------------------------------------------------
    def list_saes(self) -> list[dict]:
        return self._rows(
            "SELECT sae, arch, model, hook, width, experts, active, k, n_tokens FROM saes ORDER BY sae"
        )

    def sae_info(self, sae: str) -> SAEInfo | None:
        r = self._one("SELECT * FROM saes WHERE sae = ?", [sae])
        if r is None:
            return None
        return SAEInfo(
            name=r["sae"], arch=r["arch"], model=r["model"], hook=r["hook"], width=r["width"],
            experts=r["experts"], active=r["active"], k=r["k"],
            config=_json(r["config"], {}), metrics=_json(r["metrics"], {}),
            training_log=_json(r["training_log"], []), n_tokens=r["n_tokens"] or 0,
            n_contexts=r["n_contexts"] or 0, hist_edges=list(r["hist_edges"] or []),
            load_entropy=r["load_entropy"], map_method=r["map_method"] or "",
            logit_note=r["logit_note"] or "",
        )

    def steering_payload(self, key: str) -> Any | None:
        """A steering result stored in the build itself under `key` (None when absent)."""
        r = self._one("SELECT payload FROM steering_cache WHERE key = ?", [key])
        return json.loads(r["payload"]) if r is not None else None

    def training_log(self, sae: str) -> list[dict]:
        r = self._one("SELECT training_log FROM saes WHERE sae = ?", [sae])
        return _json(r["training_log"], []) if r else []

    def models(self) -> list[dict]:
        rows = self._rows("SELECT name, hook, d_model, n_layers, info FROM models ORDER BY name")
        for r in rows:
            r["info"] = _json(r["info"], {})
        return rows

    def domains(self) -> list[str]:
        return [r["domain"] for r in self._rows(
            "SELECT DISTINCT domain FROM contexts ORDER BY domain"
        )]

    # -- experts ---------------------------------------------------------------------------
    def experts(self, sae: str) -> list[dict]:
        rows = self._rows(
            "SELECT expert, n_features, n_alive, load_top1, load_topk, omega, mean_confidence,"
            " router_entropy, domain_entropy, top_tokens FROM experts WHERE sae = ? ORDER BY expert",
            [sae],
        )
        for r in rows:
            r["top_tokens"] = _json(r["top_tokens"], [])
        return rows

    def expert_domain_load(self, sae: str) -> list[dict]:
        return self._rows(
            "SELECT expert, domain, n_tokens, load_top1, load_topk FROM expert_domain_load"
            " WHERE sae = ? ORDER BY expert, domain",
            [sae],
        )

    def expert_similarity(self, sae: str) -> np.ndarray:
        rows = self._rows(
            "SELECT i, j, value FROM expert_similarity WHERE sae = ?", [sae]
        )
        if not rows:
            return np.zeros((0, 0))
        n = max(max(r["i"], r["j"]) for r in rows) + 1
        out = np.full((n, n), np.nan)
        for r in rows:
            out[r["i"], r["j"]] = r["value"]
        return out

    def expert_top_features(self, sae: str, expert: int, limit: int = 20) -> list[dict]:
        return self._rows(
            "SELECT feature, n_fires, density, max_act, top_tokens FROM features"
            " WHERE sae = ? AND expert = ? ORDER BY n_fires DESC, feature LIMIT ?",
            [sae, int(expert), int(limit)],
        )

    def expert_top_tokens(self, sae: str, expert: int, limit: int = 20) -> list[dict]:
        r = self._one(
            "SELECT top_tokens FROM experts WHERE sae = ? AND expert = ?", [sae, int(expert)]
        )
        return _json(r["top_tokens"], [])[: int(limit)] if r else []

    # -- features --------------------------------------------------------------------------
    def feature(self, sae: str, f: int) -> FeatureInfo | None:
        r = self._one(
            "SELECT f.*, s.hist_edges FROM features f JOIN saes s USING (sae)"
            " WHERE f.sae = ? AND f.feature = ?",
            [sae, int(f)],
        )
        if r is None:
            return None
        nbrs = self._rows(
            "SELECT n.other AS feature, n.cos, g.expert, g.top_tokens"
            " FROM neighbours n JOIN features g ON g.sae = n.sae AND g.feature = n.other"
            " WHERE n.sae = ? AND n.feature = ? ORDER BY n.rank",
            [sae, int(f)],
        )
        return FeatureInfo(
            sae=sae, feature=r["feature"], expert=r["expert"], n_fires=r["n_fires"] or 0,
            density=r["density"] or 0.0, mean_act=r["mean_act"] or 0.0,
            max_act=r["max_act"] or 0.0, x=r["x"], y=r["y"], cluster=r["cluster"],
            max_cos=r["max_cos"] if r["max_cos"] is not None else float("nan"),
            top_tokens=r["top_tokens"] or "", preferred_domain=r["preferred_domain"],
            domain_counts=_json(r["domain_counts"], {}),
            hist_counts=list(r["hist"] or []), hist_edges=list(r["hist_edges"] or []),
            logit_pos=list(zip(r["logit_pos"] or [], r["logit_pos_val"] or [], strict=False)),
            logit_neg=list(zip(r["logit_neg"] or [], r["logit_neg_val"] or [], strict=False)),
            neighbours=nbrs,
        )

    def feature_examples(
        self, sae: str, f: int, kind: str = "top", limit: int = 20, band: int | None = None
    ) -> list[dict]:
        """Top examples (kind='top', highest first) or quantile-band samples (kind='band')."""
        if kind not in ("top", "band"):
            raise ValueError("kind must be 'top' or 'band'")
        rows = self._rows(
            "SELECT e.rank, e.band, e.context, c.domain, e.position, e.activation,"
            " c.tokens, e.act_pos, e.act_val"
            " FROM examples e JOIN contexts c ON c.id = e.context"
            " WHERE e.sae = ? AND e.feature = ? AND e.kind = ?"
            " AND (CAST(? AS SMALLINT) IS NULL OR e.band = ?)"
            " ORDER BY e.band DESC, e.rank LIMIT ?",
            [sae, int(f), kind, band, band, int(limit)],
        )
        for r in rows:
            acts = [0.0] * len(r["tokens"])
            for p, v in zip(r.pop("act_pos") or [], r.pop("act_val") or [], strict=False):
                if p < len(acts):
                    acts[p] = v
            r["acts"] = acts
        return rows

    def quantile_bands(self, sae: str, f: int, with_examples: bool = True) -> list[dict]:
        """Bands over (0, max]; highest band first. `share` = fraction of the feature's activations in it."""
        bands = self._rows(
            "SELECT band, lo, hi, n, share FROM bands WHERE sae = ? AND feature = ?"
            " ORDER BY band DESC",
            [sae, int(f)],
        )
        if with_examples and bands:
            ex = self.feature_examples(sae, f, kind="band", limit=100_000)
            for b in bands:
                b["examples"] = [e for e in ex if e["band"] == b["band"]]
        return bands

    def map_points(self, sae: str) -> dict[str, np.ndarray]:
        cur = self._cur()
        try:
            return cur.execute(
                "SELECT feature, x, y, expert, cluster, density, max_act, top_tokens,"
                " preferred_domain FROM features WHERE sae = ? ORDER BY feature",
                [sae],
            ).fetchnumpy()
        finally:
            cur.close()

    def max_cos_distribution(self, sae: str) -> dict[str, np.ndarray]:
        cur = self._cur()
        try:
            return cur.execute(
                "SELECT max_cos, expert FROM features WHERE sae = ? ORDER BY feature", [sae]
            ).fetchnumpy()
        finally:
            cur.close()

    def duplicate_pairs(
        self, sae: str, threshold: float = 0.9, limit: int = 500, scope: str = "all"
    ) -> list[dict]:
        if scope not in ("all", "within", "across"):
            raise ValueError("scope must be 'all', 'within' or 'across'")
        within = {"all": None, "within": True, "across": False}[scope]
        return self._rows(
            "SELECT p.a, p.b, p.cos, p.expert_a, p.expert_b, p.within,"
            " fa.top_tokens AS top_tokens_a, fb.top_tokens AS top_tokens_b"
            " FROM (SELECT * FROM duplicate_pairs WHERE sae = ? AND cos > ?"
            "       AND (CAST(? AS BOOLEAN) IS NULL OR within = ?)"
            "       ORDER BY cos DESC, a, b LIMIT ?) p"
            " LEFT JOIN features fa ON fa.sae = ? AND fa.feature = p.a"
            " LEFT JOIN features fb ON fb.sae = ? AND fb.feature = p.b"
            " ORDER BY p.cos DESC, p.a, p.b",
            [sae, float(threshold), within, within, int(limit), sae, sae],
        )

    def pair_cos_range(self, sae: str) -> tuple[float, float] | None:
        """(lowest, highest) cosine among the stored pairs of `sae`: every pair above the
        lowest is stored, so a threshold in this range lists all of them."""
        r = self._one("SELECT min(cos) AS lo, max(cos) AS hi, count(*) AS n FROM duplicate_pairs"
                      " WHERE sae = ?", [sae])
        return (float(r["lo"]), float(r["hi"])) if r and r["n"] else None

    # -- two SAEs, feature by feature ---------------------------------------------------------
    def comparisons(self, sae: str) -> list[str]:
        """The SAEs whose features are matched with `sae`'s (same model and hook)."""
        return [r["other"] for r in self._rows(
            "SELECT DISTINCT other FROM feature_matches WHERE sae = ? ORDER BY other", [sae])]

    def feature_matches(self, sae: str, other: str, order: str = "unmatched", limit: int = 50,
                        expert: int | None = None) -> list[dict]:
        """`sae`'s features with their nearest and their one-to-one partner in `other`:
        order 'unmatched' (lowest nearest cosine first: what only `sae` has), 'shared' (highest
        first: what both learned) or 'feature'; optionally one expert of `sae`."""
        orders = {"unmatched": "m.nearest_cos ASC, m.feature", "shared": "m.nearest_cos DESC, m.feature",
                  "feature": "m.feature"}
        if order not in orders:
            raise ValueError("order must be 'unmatched', 'shared' or 'feature'")
        return self._rows(
            "SELECT m.feature, fa.expert, fa.top_tokens, fa.density, m.nearest, m.nearest_cos,"
            " fb.expert AS nearest_expert, fb.top_tokens AS nearest_top_tokens, m.partner,"
            " m.partner_cos"
            " FROM feature_matches m JOIN features fa ON fa.sae = m.sae AND fa.feature = m.feature"
            " LEFT JOIN features fb ON fb.sae = m.other AND fb.feature = m.nearest"
            " WHERE m.sae = ? AND m.other = ? AND fa.n_fires > 0"
            " AND (CAST(? AS INTEGER) IS NULL OR fa.expert = ?)"
            f" ORDER BY {orders[order]} LIMIT ?",
            [sae, other, expert, expert, int(limit)],
        )

    def match_of(self, sae: str, other: str, feature: int) -> dict | None:
        return self._one(
            "SELECT feature, nearest, nearest_cos, partner, partner_cos FROM feature_matches"
            " WHERE sae = ? AND other = ? AND feature = ?", [sae, other, int(feature)])

    def match_cos(self, sae: str, other: str) -> dict[str, np.ndarray]:
        """nearest_cos, partner_cos and expert of every feature of `sae` that fires."""
        cur = self._cur()
        try:
            return cur.execute(
                "SELECT m.nearest_cos, m.partner_cos, f.expert FROM feature_matches m"
                " JOIN features f ON f.sae = m.sae AND f.feature = m.feature"
                " WHERE m.sae = ? AND m.other = ? AND f.n_fires > 0 ORDER BY m.feature",
                [sae, other],
            ).fetchnumpy()
        finally:
            cur.close()

    def expert_matches(self, sae: str, other: str) -> tuple[np.ndarray, np.ndarray]:
        """([N_sae, N_other] share of expert i's features whose nearest feature in `other` is in
        expert j, the same shape of mean cosines)."""
        rows = self._rows("SELECT i, j, share, mean_cos FROM expert_matches WHERE sae = ? AND other = ?",
                          [sae, other])
        if not rows:
            return np.zeros((0, 0)), np.zeros((0, 0))
        n, m = max(r["i"] for r in rows) + 1, max(r["j"] for r in rows) + 1
        share, mean = np.full((n, m), np.nan), np.full((n, m), np.nan)
        for r in rows:
            share[r["i"], r["j"]] = r["share"]
            mean[r["i"], r["j"]] = r["mean_cos"] if r["mean_cos"] is not None else np.nan
        return share, mean

    # -- text --------------------------------------------------------------------------------
    def search_contexts(self, text: str, limit: int = 20) -> list[dict]:
        """Analysed contexts whose text contains `text` (any case): context, domain, split,
        tokens, and `hits`, the positions of the tokens the matches end on."""
        needle = text.lower()
        if not needle.strip():
            return []
        rows = self._rows(
            "SELECT id AS context, domain, split, tokens FROM contexts"
            " WHERE contains(lower_text, ?) ORDER BY id LIMIT ?",
            [needle, int(limit)],
        )
        for r in rows:
            starts = np.cumsum([0] + [len(t) for t in r["tokens"]])[:-1]
            low = "".join(r["tokens"]).lower()
            ends, at = set(), low.find(needle)
            while at >= 0:  # the token each match ends in
                ends.add(int(np.searchsorted(starts, at + len(needle) - 1, side="right")) - 1)
                at = low.find(needle, at + 1)
            r["hits"] = sorted(ends)
        return rows

    def context_codes(self, sae: str, context_id: int) -> list[list[tuple[int, float]]]:
        """Per position of an analysed context: its non-zero codes [(feature, activation)],
        strongest first (empty at dropped positions)."""
        return self.contexts_codes(sae, [context_id]).get(int(context_id), [])

    def contexts_codes(self, sae: str, context_ids: Sequence[int]) -> dict[int, list]:
        """`context_codes` of several contexts in one query: context → per-position codes."""
        ids = [int(c) for c in context_ids]
        if not ids:
            return {}
        rows = self._rows("SELECT context, per_token AS k, features, acts FROM context_codes"
                          " WHERE sae = ? AND list_contains(?, context)", [sae, ids])
        out = {}
        for r in rows:
            f = np.asarray(r["features"]).reshape(-1, r["k"])
            a = np.asarray(r["acts"], dtype=np.float32).reshape(-1, r["k"])
            out[int(r["context"])] = [
                [(int(fi[j]), float(ai[j])) for j in np.argsort(-ai, kind="stable")
                 if fi[j] >= 0 and ai[j] > 0]
                for fi, ai in zip(f, a, strict=True)]
        return out

    def search_features(self, sae: str, text: str, limit: int = 50) -> list[dict]:
        """Features whose top-activating tokens or top logit tokens contain `text` (any case)."""
        needle = text.strip().lower()
        if not needle:
            return []
        return self._rows(
            "SELECT feature, expert, density, max_act, top_tokens,"
            " CASE WHEN contains(lower(top_tokens), ?) THEN 'top tokens' ELSE 'logits' END AS matched"
            " FROM features WHERE sae = ? AND (contains(lower(top_tokens), ?)"
            " OR contains(lower(array_to_string(logit_pos, ' ')), ?))"
            " ORDER BY (contains(lower(top_tokens), ?)) DESC, n_fires DESC, feature LIMIT ?",
            [needle, sae, needle, needle, needle, int(limit)],
        )

    # -- contexts and routing ----------------------------------------------------------------
    def context(self, context_id: int) -> dict | None:
        return self._one(
            "SELECT id AS context, domain, split, tokens, token_ids FROM contexts WHERE id = ?",
            [int(context_id)],
        )

    def context_routing(self, sae: str, context_id: int) -> list[dict]:
        ctx = self.context(context_id)
        if ctx is None:
            return []
        r = self._one(
            "SELECT experts, weights FROM routing WHERE sae = ? AND context = ?",
            [sae, int(context_id)],
        )
        info = self._one("SELECT active FROM saes WHERE sae = ?", [sae])
        e = (info or {}).get("active") or 1
        out = []
        for p, tok in enumerate(ctx["tokens"]):
            ex, wt = [], []
            if r is not None and r["experts"]:
                sl = slice(p * e, (p + 1) * e)
                ex = [int(v) for v in r["experts"][sl] if v >= 0]
                wt = [float(w) for v, w in zip(r["experts"][sl], r["weights"][sl], strict=False) if v >= 0]
            out.append({"position": p, "token": tok, "experts": ex, "weights": wt})
        return out

    def sample_contexts(
        self, sae: str, n: int = 20, domain: str | None = None, seed: int = 0
    ) -> list[dict]:
        """Contexts analysed for this SAE (with routing for MoE SAEs), optionally one domain."""
        rows = self._rows(
            "SELECT c.id AS context, c.domain, c.tokens FROM contexts c"
            " WHERE (CAST(? AS VARCHAR) IS NULL OR c.domain = ?)"
            " AND (NOT EXISTS (SELECT 1 FROM routing WHERE sae = ?)"
            "      OR c.id IN (SELECT context FROM routing WHERE sae = ?))"
            " ORDER BY c.id",
            [domain, domain, sae, sae],
        )
        rng = random.Random(seed)
        if len(rows) > n:
            rows = sorted(rng.sample(rows, n), key=lambda r: r["context"])
        for r in rows:
            r["text"] = "".join(r.pop("tokens"))[:200]
        return rows


def _json(v: Any, default: Any) -> Any:
    if v is None:
        return default
    if isinstance(v, str):
        return json.loads(v)
    return v


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
