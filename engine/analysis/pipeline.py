"""One streaming pass over the analysis tokens → everything the explorer shows, in one DuckDB file.

`analyze(runs, acts, model, db_path, cfg)` reads the harvested activations of the analysis
contexts (the eval split; no model forward is needed, they were harvested), encodes each chunk
with *every* SAE of the build, and updates per-feature running statistics (`stats`): a running
top-k buffer per feature, log-spaced histogram counts, fire counts / sums / maxima and
per-domain counts, plus expert routing for MoE SAEs. The sparse codes of each chunk are
spilled to a temporary memory-mapped file for the examples (`examples`).

Then, from the weights only: logit effects (`logits`), nearest neighbours, duplicate pairs and
the expert × expert similarity from one geometry pass (`engine.metrics.geometry`), a 2-D map
and clusters (`map`). The model is used for token strings and for W_U / the final norm only.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..metrics.geometry import decoder_geometry
from ..runtime import Runtime, resolve
from ..sae import registry
from ..store import BuildWriter
from .config import AnalysisConfig
from .examples import sample_bands, write_examples
from .logits import logit_effects
from .map import map_coordinates, spherical_kmeans
from .state import SAEPass
from .tables import (
    write_bands,
    write_context_codes,
    write_experts,
    write_features,
    write_geometry,
    write_matches,
    write_sae_row,
)
from .tokens import AnalysisTokens, analysis_tokens


def analyze(
    runs: Sequence[tuple[str, Any, dict]],
    acts,
    model,
    db_path: str | Path,
    cfg: AnalysisConfig | None = None,
    metrics: dict[str, dict] | None = None,
    training_logs: dict[str, list] | None = None,
    build_hash: str | None = None,
    progress: bool = True,
) -> Path:
    """Analyse every SAE of a build in one pass and write the DuckDB file atomically.

    runs: (name, sae, meta) per SAE — meta is the checkpoint's cfg.json dict (model, hook …).
    acts: the ActivationStore all SAEs were trained on; its eval split is analysed.
    model: a LoadedModel (token strings; W_U and final norm for logit effects).
    Returns db_path.
    """
    cfg = cfg or AnalysisConfig()
    if not runs:
        raise DataError("There is nothing to analyse: the build has no SAE.")
    db_path = Path(db_path)
    metrics = metrics or {}
    training_logs = training_logs or {}
    t_start = time.perf_counter()
    tokens = analysis_tokens(acts, cfg.analysis_contexts, cfg.analysis_split)
    rt = resolve(cfg.runtime)
    for name, sae, _meta in runs:
        sae.to(rt.device)
        if sae.cfg.d_in != acts.d_in:
            raise DataError(
                f"SAE '{name}' reads width {sae.cfg.d_in} but the activations have width {acts.d_in}."
            )
        if not registry.get(sae.cfg.arch).topk_codes:
            topk = ", ".join(n for n in registry.all_names() if registry.get(n).topk_codes)
            raise ConfigError(
                f"SAE '{name}' is an imported {sae.cfg.arch} SAE; the analysis reads TopK-style "
                f"codes ({topk}) only."
            )

    tmpdir = tempfile.TemporaryDirectory(
        prefix="moesae-analyze-", dir=db_path.parent if db_path.parent.exists() else None
    )
    passes = []
    try:
        for i, (name, sae, meta) in enumerate(runs):
            sae.eval()
            passes.append(SAEPass.open(
                name, sae, meta, Path(tmpdir.name) / str(i), tokens.n, len(tokens.domain_names),
                len(tokens.vocab), cfg.top_examples, cfg.hist_bins,
            ))
        read_seconds = _encode_all(passes, acts, tokens, cfg.chunk_tokens, rt, progress)
        tokens.decode_strings(model)

        meta = {"build_hash": build_hash or "", "n_tokens": str(tokens.n),
                "model": getattr(model, "name", "") or "", "hook": getattr(acts, "hook", "") or ""}
        with BuildWriter(db_path, meta=meta) as w:
            w.insert("models", {
                "name": [getattr(model, "name", "") or getattr(acts, "model_name", "")],
                "hook": [getattr(acts, "hook", "")],
                "d_model": np.array([getattr(model, "d_model", acts.d_in)]),
                "n_layers": np.array([getattr(model, "n_layers", 0) or 0]),
                "info": [json.dumps({"activations": str(getattr(acts, "path", "")),
                                     "norm_scale": float(getattr(acts, "norm_scale", 1.0) or 1.0)})],
            })
            w.insert("contexts", {
                "id": tokens.chosen.astype(np.int32),
                "domain": tokens.context_domains,
                "split": tokens.context_splits,
                "token_ids": tokens.context_tokens.astype(np.int32),
                "tokens": [[tokens.strings[int(t)] for t in row] for row in tokens.context_tokens],
            })
            timing = {
                p.name: _write_sae(w, p, acts, model, tokens, cfg, metrics.get(p.name, {}),
                                   training_logs.get(p.name, []))
                for p in passes
            }
            if cfg.compare:
                t0 = time.perf_counter()
                for i, a in enumerate(passes):
                    for b in passes[i + 1 :]:
                        write_matches(w, a, b)
                timing["compare_seconds"] = round(time.perf_counter() - t0, 3)
            total = time.perf_counter() - t_start
            w.execute("INSERT INTO meta VALUES ('analysis_seconds', ?)", [f"{total:.1f}"])
            w.execute("INSERT INTO meta VALUES ('timing', ?)", [json.dumps({
                "read_seconds": round(read_seconds, 3), "per_sae": timing})])
    finally:
        for p in passes:
            p.close()
        tmpdir.cleanup()
    return db_path


def _encode_all(passes: list[SAEPass], acts, tokens: AnalysisTokens, chunk: int, rt: Runtime,
                progress: bool) -> float:
    """Pass 1: encode every chunk with every SAE; update statistics and spill the codes."""
    bar = tqdm(total=tokens.n, desc="analyse", unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not progress)
    read_seconds = 0.0
    for s in range(0, tokens.n, chunk):
        e = min(tokens.n, s + chunk)
        t0 = time.perf_counter()
        x_raw = torch.from_numpy(np.ascontiguousarray(tokens.read(s, e), dtype=np.float32))
        if not torch.isfinite(x_raw).all():
            raise DataError("The activation store holds NaN or infinite values; harvest again.")
        read_seconds += time.perf_counter() - t0
        tok = torch.arange(s, e)
        for p in passes:
            sae = p.sae
            t0 = time.perf_counter()
            with torch.no_grad(), rt.autocast():
                codes = sae.encode(sae.normalise(x_raw.to(sae.W_dec.device, sae.W_dec.dtype)))
            codes = type(codes)(*[c.detach().cpu() if isinstance(c, torch.Tensor) else c for c in codes])
            top_acts = codes.top_acts.float()
            t1 = time.perf_counter()
            p.encode_seconds += t1 - t0
            p.stats.update(top_acts, codes.top_indices, tok, tokens.domain[s:e])
            if p.routing is not None:
                p.routing.update(codes, tok, tokens.domain[s:e], tokens.vocab_index[s:e])
            p.spill_v[s:e] = top_acts.numpy()
            p.spill_i[s:e] = codes.top_indices.numpy()
            p.stats_seconds += time.perf_counter() - t1
        bar.update(e - s)
    bar.close()
    return read_seconds


def _write_sae(w, p: SAEPass, acts, model, tokens: AnalysisTokens, cfg: AnalysisConfig,
               metrics: dict, training_log: list) -> dict:
    """Everything one SAE contributes to the build; returns its timings in seconds."""
    sae = p.sae
    M, N = sae.cfg.width, sae.cfg.experts
    timing = {"encode_seconds": round(p.encode_seconds, 3), "stats_seconds": round(p.stats_seconds, 3)}

    def timed(key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timing[key] = round(time.perf_counter() - t0, 3)
        return out

    sampler = timed("bands_seconds", sample_bands, p, cfg.bands, cfg.per_band, cfg.analysis_seed,
                    cfg.chunk_tokens)
    expert_of = sae.feature_expert()
    geo = timed("neighbours_seconds", lambda: decoder_geometry(
        sae.W_dec, expert_of, N, neighbours=cfg.neighbours, pair_threshold=cfg.dup_threshold,
        max_pairs=cfg.max_pairs, min_pairs=cfg.min_pairs, block=1024))
    xy, map_method = timed("map_seconds", map_coordinates, sae.W_dec, cfg.umap, cfg.analysis_seed)
    if cfg.clusters is None:
        labels = np.full(M, -1, np.int32)
    else:
        labels = spherical_kmeans(sae.W_dec, cfg.clusters or max(2, round(math.sqrt(M / 2))),
                                  cfg.analysis_seed)
    logits = timed("logits_seconds", logit_effects, sae.W_dec, model, cfg.logit_tokens)
    if logits is not None:
        tokens.decode_strings(model, np.concatenate([logits[1].reshape(-1).numpy(),
                                                     logits[3].reshape(-1).numpy()]))
    write_features(w, p, tokens, geo, xy, labels, logits)
    write_geometry(w, p, geo)
    write_bands(w, p, sampler, cfg.bands)
    timed("examples_seconds", write_examples, w, p, sampler, tokens, cfg.bands)
    write_context_codes(w, p, tokens)
    entropy = write_experts(w, p, tokens, expert_of.cpu().numpy())
    write_sae_row(w, p, acts, len(tokens.chosen), metrics, training_log, entropy, map_method,
                  logits is not None)
    return timing
