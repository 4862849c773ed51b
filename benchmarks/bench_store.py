"""Query latency of the explorer's hot paths on a synthetic build with ≥ 50,000 features.

    python benchmarks/bench_store.py [--features 50000] [--experts 64] [--repeats 200] [--db PATH]

Prints a table and one JSON line: p50/p95 milliseconds for the feature page (feature +
top examples + quantile bands), the map points and the duplicate-pair list. The issue's
target is p95 < 50 ms per query; this script reports, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.store import BuildWriter, open_db, ragged_list_column  # noqa: E402


def make_synthetic_db(path: Path, n_features: int = 50_000, n_experts: int = 64, seed: int = 0,
                      n_contexts: int = 2000, ctx_len: int = 128, top_k: int = 20,
                      bands: int = 10, per_band: int = 5, hist_bins: int = 64) -> None:
    rng = np.random.default_rng(seed)
    M, N, L = n_features, n_experts, ctx_len
    vocab = [f"tok{i}" for i in range(5000)]
    with BuildWriter(path) as w:
        w.insert("models", {"name": ["synthetic"], "hook": ["blocks.6.hook_resid_post"],
                            "d_model": np.array([576]), "n_layers": np.array([30]), "info": ["{}"]})
        w.insert("saes", {
            "sae": ["bench"], "model": ["synthetic"], "hook": ["blocks.6.hook_resid_post"],
            "arch": ["scale"], "width": np.array([M]), "experts": np.array([N]),
            "active": np.array([2]), "k": np.array([32]), "config": ['{"arch": "scale"}'],
            "metrics": ['{"fvu": 0.1}'], "training_log": ['[{"step": 0, "fvu": 1.0}]'],
            "n_tokens": np.array([L * n_contexts]), "n_contexts": np.array([n_contexts]),
            "hist_edges": np.logspace(-4, 4, hist_bins + 1)[None, :],
            "load_entropy": np.array([0.95]), "map_method": ["umap"], "logit_note": [""]})
        tok_ids = rng.integers(0, len(vocab), (n_contexts, L)).astype(np.int32)
        w.insert("contexts", {
            "id": np.arange(n_contexts), "domain": [["pydoc", "bible", "fortunes"][i % 3] for i in range(n_contexts)],
            "token_ids": tok_ids, "tokens": [[vocab[t] for t in row] for row in tok_ids]})
        w.insert("features", {
            "sae": ["bench"] * M, "feature": np.arange(M), "expert": np.arange(M) // (M // N),
            "n_fires": rng.integers(0, 10_000, M), "density": rng.random(M) * 0.01,
            "mean_act": rng.random(M), "max_act": rng.random(M) * 10,
            "x": rng.standard_normal(M).astype(np.float32), "y": rng.standard_normal(M).astype(np.float32),
            "cluster": rng.integers(0, 20, M), "max_cos": rng.random(M).astype(np.float32),
            "top_tokens": [" · ".join(vocab[j] for j in rng.integers(0, 5000, 3)) for _ in range(M)],
            "preferred_domain": ["pydoc"] * M, "domain_counts": ['{"pydoc": 3}'] * M,
            "hist": rng.integers(0, 100, (M, hist_bins)),
            "logit_pos": [[vocab[j] for j in r] for r in rng.integers(0, 5000, (M, 10))],
            "logit_pos_val": rng.random((M, 10)).astype(np.float32),
            "logit_neg": [[vocab[j] for j in r] for r in rng.integers(0, 5000, (M, 10))],
            "logit_neg_val": -rng.random((M, 10)).astype(np.float32)})
        w.insert("neighbours", {
            "sae": ["bench"] * (M * 10), "feature": np.repeat(np.arange(M), 10),
            "rank": np.tile(np.arange(10), M), "other": rng.integers(0, M, M * 10),
            "cos": rng.random(M * 10).astype(np.float32)})
        w.insert("bands", {
            "sae": ["bench"] * (M * bands), "feature": np.repeat(np.arange(M), bands),
            "band": np.tile(np.arange(bands), M), "lo": rng.random(M * bands).astype(np.float32),
            "hi": rng.random(M * bands).astype(np.float32), "n": rng.integers(0, 100, M * bands),
            "share": rng.random(M * bands)})
        # examples: top_k + bands × per_band per feature, written in chunks like analyze does
        per = top_k + bands * per_band
        for start in range(0, M, 10_000):
            f = np.arange(start, min(M, start + 10_000))
            n = len(f) * per
            nnz = rng.integers(1, 12, n)
            w.insert("examples", {
                "sae": ["bench"] * n, "feature": np.repeat(f, per),
                "kind": (["top"] * top_k + ["band"] * (bands * per_band)) * len(f),
                "band": np.tile(np.r_[np.full(top_k, -1), np.repeat(np.arange(bands), per_band)], len(f)),
                "rank": np.tile(np.r_[np.arange(top_k), np.tile(np.arange(per_band), bands)], len(f)),
                "context": rng.integers(0, n_contexts, n), "position": rng.integers(0, L, n),
                "activation": rng.random(n).astype(np.float32),
                "act_pos": ragged_list_column(rng.integers(0, L, nnz.sum()).astype(np.int16), nnz),
                "act_val": ragged_list_column(rng.random(nnz.sum()).astype(np.float32), nnz)})
        P = 20_000
        a = rng.integers(0, M, P)
        b = rng.integers(0, M, P)
        w.insert("duplicate_pairs", {
            "sae": ["bench"] * P, "a": a, "b": b, "cos": (0.7 + 0.3 * rng.random(P)).astype(np.float32),
            "expert_a": a // (M // N), "expert_b": b // (M // N), "within": (a // (M // N)) == (b // (M // N))})


def bench(db: Path, repeats: int, n_features: int, seed: int = 1) -> dict:
    store = open_db(db)
    rng = np.random.default_rng(seed)
    queries = {
        "feature page": lambda f: (store.feature("bench", f), store.feature_examples("bench", f, "top", 20),
                                   store.quantile_bands("bench", f)),
        "feature (stats+neighbours)": lambda f: store.feature("bench", f),
        "feature_examples top 20": lambda f: store.feature_examples("bench", f, "top", 20),
        "map points": lambda f: store.map_points("bench"),
        "duplicate pairs (500)": lambda f: store.duplicate_pairs("bench", 0.9, 500),
        "duplicate pairs across": lambda f: store.duplicate_pairs("bench", 0.8, 500, "across"),
        "search 'tok12'": lambda f: store.search_features("bench", "tok12", 50),
    }
    out = {}
    for name, q in queries.items():
        q(0)  # warm
        times = []
        for _ in range(repeats):
            f = int(rng.integers(0, n_features))
            t = time.perf_counter()
            q(f)
            times.append((time.perf_counter() - t) * 1000)
        out[name] = {"p50_ms": round(float(np.percentile(times, 50)), 2),
                     "p95_ms": round(float(np.percentile(times, 95)), 2)}
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=50_000)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--db", type=Path, default=None, help="reuse/keep this synthetic DB")
    args = ap.parse_args()
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.TemporaryDirectory()
        db = Path(tmp.name) / "bench.duckdb"
    if not db.exists():
        t = time.perf_counter()
        make_synthetic_db(db, args.features, args.experts)
        print(f"built synthetic DB with {args.features} features in {time.perf_counter() - t:.1f} s "
              f"({db.stat().st_size / 1e6:.0f} MB)")
    res = bench(db, args.repeats, args.features)
    print(f"{'query':32s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for k, v in res.items():
        print(f"{k:32s} {v['p50_ms']:8.2f} {v['p95_ms']:8.2f}")
    print(json.dumps({"features": args.features, "repeats": args.repeats, "latency": res}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
