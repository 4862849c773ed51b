"""A harvest folder of random activations, in the exact layout `moesae harvest` writes, for
speed benchmarks: a training step costs the same on random activations as on real ones."""

from __future__ import annotations

import concurrent.futures
import json
import math
from pathlib import Path

import numpy as np

from engine.data.activation_store import FORMAT_VERSION, ActivationStore


def synthetic_harvest(folder: str | Path, n_tokens: int, d: int = 576, context_len: int = 128,
                      eval_fraction: float = 0.01, seed: int = 0,
                      shard_tokens: int = 1 << 18) -> ActivationStore:
    """Gaussian activations (float16) with a per-dimension scale, n_tokens in all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    body = context_len - 1
    n_ctx = -(-n_tokens // body)
    n_eval = max(1, round(n_ctx * eval_fraction))
    split = ["train"] * (n_ctx - n_eval) + ["eval"] * n_eval
    np.save(folder / "contexts.npy", rng.integers(0, 1000, (n_ctx, context_len), dtype=np.int32))
    (folder / "contexts.json").write_text(json.dumps({"domains": ["synthetic"] * n_ctx, "split": split}))
    scale = rng.uniform(0.5, 2.0, d).astype(np.float32)
    per_shard = max(1, shard_tokens // body)
    jobs = [(name, k, start, min(start + per_shard, hi))
            for name, lo, hi in (("train", 0, n_ctx - n_eval), ("eval", n_ctx - n_eval, n_ctx))
            for k, start in enumerate(range(lo, hi, per_shard))]

    def write(job) -> dict:  # one shard from its own seeded generator, so shards can be made at once
        name, k, start, stop = job
        n = (stop - start) * body
        g = np.random.default_rng([seed, 0 if name == "train" else 1, k])
        x = (g.standard_normal((n, d), dtype=np.float32) * scale).astype(np.float16)
        idx = np.stack([np.repeat(np.arange(start, stop, dtype=np.int32), body),
                        np.tile(np.arange(1, context_len, dtype=np.int32), stop - start)], 1)
        file = f"{name}-{k:05d}"
        np.save(folder / f"{file}.npy", x)
        np.save(folder / f"{file}.idx.npy", idx)
        x32 = x.astype(np.float32)
        np.save(folder / f"{file}.norms.npy", np.sqrt(np.einsum("ij,ij->i", x32, x32)))
        return {"file": file, "split": name, "contexts": [start, stop], "n_tokens": n, "dropped": 0,
                "sum_sq": float(np.einsum("ij,ij->", x32, x32, dtype=np.float64))}

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        shards = list(pool.map(write, jobs))
    sum_sq = {name: sum(s["sum_sq"] for s in shards if s["split"] == name) for name in ("train", "eval")}
    n_train = sum(s["n_tokens"] for s in shards if s["split"] == "train")
    manifest = {
        "format": FORMAT_VERSION, "config": {"synthetic": True, "seed": seed}, "model_name": "synthetic",
        "hook": "synthetic", "d_in": d, "dtype": "float16", "context_len": context_len,
        "first_position": 1, "n_contexts": n_ctx, "shards": shards, "complete": True,
        "norm_scale": math.sqrt(d / (sum_sq["train"] / n_train)),
        "n_tokens": {s: sum(x["n_tokens"] for x in shards if x["split"] == s) for s in ("train", "eval")},
        "dropped_outliers": 0,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return ActivationStore(folder)
