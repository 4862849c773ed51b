"""One streaming pass over the analysis tokens → everything the explorer shows, in one DuckDB file.

`analyze(runs, acts, model, db_path)` reads the harvested activations of the analysis contexts
(the eval split; no model forward is needed, they were harvested), encodes each chunk with
*every* SAE of the build, and updates per-feature running statistics with vectorised torch
ops: a running top-k buffer per feature, log-spaced histogram counts, fire counts / sums /
maxima and per-domain counts, plus expert routing for MoE SAEs. Memory is O(M · top_k +
M · bins) per SAE, independent of the number of tokens.

The sparse codes of each chunk (k values + indices per token) are also spilled to a
temporary memory-mapped file. A second, cheap pass reads only those codes (no model, no
encoder) to (a) reservoir-sample the quantile-band examples — band edges are fractions of
each feature's maximum, which is only known at the end of the first pass — and (b) cut out
each example's activations over its whole context. Both stay bounded in memory.

Then, from the weights only: logit effects, nearest neighbours and duplicate pairs by
blocked decoder cosine, the expert × expert similarity matrix (METHOD.md §4), a 2-D map
(UMAP, cosine metric, fixed seed; PCA for tiny SAEs) and spherical k-means clusters.

The model is used for token strings and for W_U / the final norm only.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError
from .store import BuildWriter, ragged_list_column

HIST_RANGE = (1e-3, 1e3)
"""Shared log-spaced histogram range (normalised-space activations); values outside land in
the first / last bin, so counts always sum to the number of firings."""

LOGIT_NOTE = (
    "Logit effect of feature f = (W_dec[f] ⊙ γ) @ W_U, where γ is the learned scale of the "
    "model's final norm (its weight; LayerNorm's centring is applied too, its bias is not). The "
    "norm's division by the residual's RMS depends on the whole residual, not on the feature, so "
    "it is left out: values are a per-unit-activation direction effect, comparable across features."
)


# --------------------------------------------------------------------------------------------
# Vectorised running statistics
# --------------------------------------------------------------------------------------------


def merge_topk(
    buf_val: Tensor, buf_id: Tensor, keys: Tensor, vals: Tensor, ids: Tensor
) -> None:
    """Merge candidates (key, value, id) into per-key top-K buffers, in place.

    buf_val/buf_id [R, K] hold each row's K largest values (descending, -inf = empty) and their
    ids. Candidates are first cut to K per key (sort by value, then stable sort by key), then
    merged with `torch.topk` over [buffer ‖ candidates] for the touched rows only.
    """
    if keys.numel() == 0:
        return
    K = buf_val.shape[1]
    keep = vals > buf_val[keys, K - 1]  # cannot enter a full buffer otherwise
    keys, vals, ids = keys[keep], vals[keep], ids[keep]
    if keys.numel() == 0:
        return
    order = torch.argsort(vals, descending=True, stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    keys, vals, ids = keys[order], vals[order], ids[order]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keys.numel(), device=keys.device) - torch.repeat_interleave(starts, counts)
    sel = rank < K
    row = torch.repeat_interleave(torch.arange(uniq.numel(), device=keys.device), counts)[sel]
    rank, vals, ids = rank[sel], vals[sel], ids[sel]
    cand_val = buf_val.new_full((uniq.numel(), K), -math.inf)
    cand_id = buf_id.new_full((uniq.numel(), K), -1)
    cand_val[row, rank] = vals
    cand_id[row, rank] = ids
    all_val = torch.cat([buf_val[uniq], cand_val], 1)
    all_id = torch.cat([buf_id[uniq], cand_id], 1)
    top, pos = all_val.topk(K, dim=1)
    buf_val[uniq] = top
    buf_id[uniq] = all_id.gather(1, pos)


def band_of(vals: Tensor, max_act: Tensor, bands: int) -> Tensor:
    """Band b holds activations in [b, b+1) · max/bands (the last band includes max)."""
    b = torch.floor(vals * bands / max_act.clamp_min(1e-30)).long()
    return b.clamp_(0, bands - 1)


class FeatureStats:
    """Running per-feature statistics of one SAE over a stream of sparse codes."""

    def __init__(self, M: int, n_domains: int, top_k: int = 20, hist_bins: int = 48,
                 hist_range: tuple[float, float] = HIST_RANGE):
        self.M, self.D, self.K, self.B = M, n_domains, top_k, hist_bins
        self.edges = torch.logspace(math.log10(hist_range[0]), math.log10(hist_range[1]), hist_bins + 1,
                                    dtype=torch.float64)
        self._inner = self.edges[1:-1].float()
        self.n_fires = torch.zeros(M, dtype=torch.long)
        self.sum = torch.zeros(M, dtype=torch.float64)
        self.max = torch.zeros(M)
        self.hist = torch.zeros(M * hist_bins, dtype=torch.long)
        self.domain = torch.zeros(M * max(n_domains, 1), dtype=torch.long)
        self.top_val = torch.full((M, top_k), -math.inf)
        self.top_tok = torch.full((M, top_k), -1, dtype=torch.long)
        self.n_tokens = 0

    def update(self, top_acts: Tensor, top_indices: Tensor, token_ids: Tensor, domains: Tensor) -> None:
        """top_acts/top_indices [B, k]; token_ids [B] global analysis-token index; domains [B]."""
        B, k = top_acts.shape
        self.n_tokens += B
        vals = top_acts.reshape(-1).float()
        feats = top_indices.reshape(-1).long()
        live = vals > 0  # TopK can select zeros when fewer than k features are positive
        vals, feats = vals[live], feats[live]
        rows = torch.arange(B).repeat_interleave(k)[live]
        toks = token_ids.long()[rows]
        ones = torch.ones_like(feats)
        self.n_fires.index_add_(0, feats, ones)
        self.sum.index_add_(0, feats, vals.double())
        self.max.scatter_reduce_(0, feats, vals, reduce="amax")
        bins = torch.bucketize(vals, self._inner, right=True)
        self.hist.index_add_(0, feats * self.B + bins, ones)
        if self.D:
            self.domain.index_add_(0, feats * self.D + domains.long()[rows], ones)
        merge_topk(self.top_val, self.top_tok, feats, vals, toks)

    def hist_counts(self) -> Tensor:
        return self.hist.view(self.M, self.B)

    def domain_counts(self) -> Tensor:
        return self.domain.view(self.M, max(self.D, 1))


class BandSampler:
    """Uniform sample of up to `per_band` tokens per (feature, band), plus exact band counts.

    Bottom-k sampling: every occurrence draws a random priority and each (feature, band)
    keeps the `per_band` smallest — a uniform sample without replacement, mergeable chunk by
    chunk with the same top-k buffer as the examples.
    """

    def __init__(self, max_act: Tensor, bands: int = 10, per_band: int = 5, seed: int = 0):
        self.max_act, self.bands = max_act.float(), bands
        M = max_act.numel()
        self.prio = torch.full((M * bands, per_band), -math.inf)
        self.tok = torch.full((M * bands, per_band), -1, dtype=torch.long)
        self.counts = torch.zeros(M * bands, dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, top_acts: Tensor, top_indices: Tensor, token_ids: Tensor) -> None:
        B, k = top_acts.shape
        vals = top_acts.reshape(-1).float()
        feats = top_indices.reshape(-1).long()
        live = vals > 0
        vals, feats = vals[live], feats[live]
        toks = token_ids.long()[torch.arange(B).repeat_interleave(k)[live]]
        keys = feats * self.bands + band_of(vals, self.max_act[feats], self.bands)
        self.counts.index_add_(0, keys, torch.ones_like(keys))
        # larger "value" = smaller priority, so topk keeps the smallest priorities
        u = -torch.rand(vals.numel(), generator=self.gen)
        merge_topk(self.prio, self.tok, keys, u, toks)

    def samples(self) -> Tensor:
        """[M, bands, per_band] sampled token ids (-1 = fewer occurrences than per_band)."""
        return self.tok.view(self.max_act.numel(), self.bands, -1)


class RoutingStats:
    """Expert load (overall and per domain), router confidence and tokens routed, for MoE SAEs."""

    def __init__(self, N: int, e: int, n_domains: int, n_vocab: int, n_tokens: int):
        self.N, self.e, self.D, self.V = N, e, n_domains, n_vocab
        self.top1 = torch.zeros(max(n_domains, 1) * N, dtype=torch.long)
        self.topk = torch.zeros(max(n_domains, 1) * N, dtype=torch.long)
        self.conf = torch.zeros(N, dtype=torch.float64)
        self.entropy = torch.zeros(N, dtype=torch.float64)
        self.tok_counts = torch.zeros(N * n_vocab, dtype=torch.long)
        # stored per analysis token so the explorer can colour text by expert
        self.experts = np.full((n_tokens, e), -1, dtype=np.int16)
        self.weights = np.zeros((n_tokens, e), dtype=np.float32)

    def update(self, codes, token_ids: Tensor, domains: Tensor, vocab_idx: Tensor) -> None:
        S, w, p = codes.expert_indices, codes.expert_weights, codes.router_probs
        first = S[:, 0]
        d = domains.long()
        self.top1.index_add_(0, d * self.N + first, torch.ones_like(first))
        flat = (d[:, None] * self.N + S).reshape(-1)
        self.topk.index_add_(0, flat, torch.ones_like(flat))
        self.conf.index_add_(0, first, p.gather(1, first[:, None])[:, 0].double())
        # router entropy H(p) / log N of each token, summed per top-1 expert
        h = -(p.double() * p.double().clamp_min(1e-30).log()).sum(-1) / math.log(self.N)
        self.entropy.index_add_(0, first, h)
        self.tok_counts.index_add_(0, first * self.V + vocab_idx.long(), torch.ones_like(first))
        t = token_ids.numpy()
        self.experts[t] = S.numpy().astype(np.int16)
        self.weights[t] = w.float().numpy()


# --------------------------------------------------------------------------------------------
# Geometry of the decoder
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def decoder_neighbours(
    W_dec: Tensor, expert_of: Tensor, n_experts: int, k: int = 10, threshold: float = 0.7,
    block: int = 1024, max_pairs: int = 200_000,
) -> dict[str, Any]:
    """Nearest neighbours by decoder cosine, duplicate pairs and expert similarity, blocked.

    Memory is O(block · M). Returns nbr_idx [M, k], nbr_cos [M, k] (highest first, self
    excluded), max_cos [M], pairs (a, b, cos) with a < b and cos ≥ threshold (the `max_pairs`
    highest), and expert_sim [N, N] = mean over features of expert i of their max cosine to
    features of expert j (self excluded when i = j), METHOD.md §4.
    """
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    M = W.shape[0]
    k = min(k, M - 1)
    nbr_idx = torch.empty(M, max(k, 0), dtype=torch.long)
    nbr_cos = torch.empty(M, max(k, 0))
    max_cos = torch.full((M,), float("nan"))
    sim_sum = torch.zeros(n_experts, n_experts, dtype=torch.float64)
    pa, pb, pc = [], [], []
    n_pairs = 0
    ex = expert_of.long()
    onehot = torch.zeros(M, n_experts)
    onehot[torch.arange(M), ex] = 1
    for s in range(0, M, block):
        e_ = min(M, s + block)
        S = W[s:e_] @ W.T  # [b, M]
        rows = torch.arange(e_ - s)
        S[rows, rows + s] = -math.inf
        if k > 0:
            v, i = S.topk(k, dim=1)
            nbr_idx[s:e_], nbr_cos[s:e_] = i, v
            max_cos[s:e_] = v[:, 0]
        # max over features of each expert j: scatter_reduce over columns grouped by expert
        per_expert = torch.full((e_ - s, n_experts), -math.inf)
        per_expert.scatter_reduce_(1, ex[None, :].expand(e_ - s, M), S, reduce="amax")
        per_expert = torch.where(torch.isfinite(per_expert), per_expert, torch.nan)
        sim_sum.index_add_(0, ex[s:e_], torch.nan_to_num(per_expert.double(), nan=0.0))
        # pairs a < b above threshold
        cols = torch.arange(M)
        mask = (S >= threshold) & (cols[None, :] > (rows + s)[:, None])
        r, c = mask.nonzero(as_tuple=True)
        if r.numel():
            pa.append(r + s)
            pb.append(c)
            pc.append(S[r, c])
            n_pairs += r.numel()
            if n_pairs > 2 * max_pairs:  # keep memory bounded: prune to the best max_pairs
                a_, b_, c_ = torch.cat(pa), torch.cat(pb), torch.cat(pc)
                top = c_.topk(max_pairs).indices
                pa, pb, pc = [a_[top]], [b_[top]], [c_[top]]
                n_pairs = max_pairs
    counts = torch.bincount(ex, minlength=n_experts).double().clamp_min(1)
    expert_sim = (sim_sum / counts[:, None]).float()
    # an expert of one feature has no "other" feature of its own
    single = torch.bincount(ex, minlength=n_experts) <= 1
    expert_sim[single, single] = float("nan")
    if pa:
        a, b, c = torch.cat(pa), torch.cat(pb), torch.cat(pc)
        if c.numel() > max_pairs:
            top = c.topk(max_pairs).indices
            a, b, c = a[top], b[top], c[top]
        order = torch.argsort(c, descending=True)
        a, b, c = a[order], b[order], c[order]
    else:
        a = b = torch.zeros(0, dtype=torch.long)
        c = torch.zeros(0)
    return {"nbr_idx": nbr_idx, "nbr_cos": nbr_cos, "max_cos": max_cos,
            "pairs": (a, b, c), "expert_sim": expert_sim}


@torch.no_grad()
def logit_effects(W_dec: Tensor, model, n: int = 10, block: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Top-n positive and negative output tokens of (W_dec[f] ⊙ γ) @ W_U (see LOGIT_NOTE)."""
    if not getattr(model, "has_lm_head", True):
        return None
    try:
        W_U = model.unembed_matrix().detach().float().cpu()  # [d, V]
    except Exception:  # no LM head (encoder models): the feature page shows none
        return None
    d = W_U.shape[0]
    gamma, centre = _final_norm_scale(model, d)
    W = W_dec.detach().float()
    M, V = W.shape[0], W_U.shape[1]
    n = min(n, V)
    pos_v, pos_i = torch.empty(M, n), torch.empty(M, n, dtype=torch.long)
    neg_v, neg_i = torch.empty(M, n), torch.empty(M, n, dtype=torch.long)
    for s in range(0, M, block):
        x = W[s : s + block]
        if centre:
            x = x - x.mean(1, keepdim=True)
        L = (x * gamma) @ W_U
        pos_v[s : s + block], pos_i[s : s + block] = L.topk(n, dim=1)
        v, i = (-L).topk(n, dim=1)
        neg_v[s : s + block], neg_i[s : s + block] = -v, i
    return pos_v, pos_i, neg_v, neg_i


def _final_norm_scale(model, d: int) -> tuple[Tensor, bool]:
    """γ of the final norm and whether it centres (LayerNorm); ones when there is none."""
    tl = getattr(model, "model", None)
    ln = getattr(tl, "ln_final", None) if tl is not None else None
    if ln is None:
        return torch.ones(d), False
    comp = getattr(ln, "original_component", None) or ln
    w = None
    for name in ("weight", "w"):
        t = getattr(comp, name, None)
        if isinstance(t, Tensor) and t.numel() == d:
            w = t
            break
    centre = "layernorm" in type(comp).__name__.lower() and "rms" not in type(comp).__name__.lower()
    if w is None:
        return torch.ones(d), centre
    # Gemma-style RMSNorm stores γ − 1
    if "gemma" in type(comp).__name__.lower():
        w = w + 1
    return w.detach().float().cpu(), centre


def map_coordinates(W_dec: Tensor, use_umap: bool = True, seed: int = 0, n_epochs: int | None = None) -> tuple[np.ndarray, str]:
    """2-D coordinates of the decoder directions: UMAP (cosine) or PCA for tiny SAEs / umap=False."""
    W = W_dec.detach().float()
    W = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    M = W.shape[0]
    if use_umap and M >= 20:
        import umap  # heavy import (numba): only when used

        n_neighbors = min(15, M - 1)
        reducer = umap.UMAP(
            n_components=2, metric="cosine", n_neighbors=n_neighbors, min_dist=0.1,
            random_state=seed, n_epochs=n_epochs or (200 if M <= 10_000 else 100), low_memory=True,
        )
        return reducer.fit_transform(W).astype(np.float32), "umap"
    if M < 2:
        return np.zeros((M, 2), np.float32), "pca"
    Wc = W - W.mean(0)
    _, _, Vt = np.linalg.svd(Wc, full_matrices=False)
    xy = Wc @ Vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy.astype(np.float32), "pca"


@torch.no_grad()
def spherical_kmeans(W_dec: Tensor, n_clusters: int, seed: int = 0, iters: int = 20) -> np.ndarray:
    """Cluster decoder directions by cosine (k-means on the unit sphere); labels [M]."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    M = W.shape[0]
    n_clusters = max(1, min(n_clusters, M))
    g = torch.Generator().manual_seed(seed)
    C = W[torch.randperm(M, generator=g)[:n_clusters]].clone()
    labels = torch.zeros(M, dtype=torch.long)
    for _ in range(iters):
        labels = torch.cat([(W[s : s + 4096] @ C.T).argmax(1) for s in range(0, M, 4096)])
        new = torch.zeros_like(C).index_add_(0, labels, W)
        norms = new.norm(dim=1, keepdim=True)
        C = torch.where(norms > 0, new / norms.clamp_min(1e-12), C)
    return labels.numpy().astype(np.int32)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def analyze(
    runs: Sequence[tuple[str, Any, dict]],
    acts,
    model,
    db_path: str | Path,
    n_contexts: int = 400,
    top_k: int = 20,
    bands: int = 10,
    per_band: int = 5,
    hist_bins: int = 48,
    n_neighbours: int = 10,
    dup_threshold: float = 0.7,
    max_pairs: int = 200_000,
    n_logits: int = 10,
    umap: bool = True,
    clusters: int | None = 0,
    seed: int = 0,
    metrics: dict[str, dict] | None = None,
    training_logs: dict[str, list] | None = None,
    build_hash: str | None = None,
    chunk_tokens: int = 4096,
    progress: bool = True,
) -> Path:
    """Analyse every SAE of a build in one pass and write the DuckDB file atomically.

    runs: (name, sae, meta) per SAE — meta is the checkpoint's cfg.json dict (model, hook …).
    acts: the ActivationStore all SAEs were trained on; its eval split is analysed.
    model: a LoadedModel (token strings; W_U and final norm for logit effects).
    n_contexts: analysis contexts (the first n eval contexts in order of id).
    dup_threshold: duplicate pairs are stored down to this cosine (default 0.7, the lowest τ
    of METHOD §4, so the explorer can slide the threshold over 0.7–1).
    clusters: number of spherical k-means clusters (0 = √(M/2), None = none).
    Returns db_path.
    """
    if not runs:
        raise DataError("There is nothing to analyse: the build has no SAE.")
    db_path = Path(db_path)
    metrics = metrics or {}
    training_logs = training_logs or {}
    t_start = time.perf_counter()

    # ---- which tokens ---------------------------------------------------------------------
    all_tokens, all_domains, _split = acts.contexts()
    all_tokens = np.asarray(all_tokens)
    ev = acts.split("eval")
    ctx_ids = np.asarray(ev.context_ids)
    positions = np.asarray(ev.positions)
    if len(ctx_ids) == 0:
        raise DataError("The activation store has no evaluation tokens to analyse; harvest more tokens.")
    chosen = np.unique(ctx_ids)[:n_contexts]
    rows = np.nonzero(np.isin(ctx_ids, chosen))[0]
    rows = rows[np.lexsort((positions[rows], ctx_ids[rows]))]  # by (context, position)
    n_tok = len(rows)
    tok_ctx = ctx_ids[rows]
    tok_pos = positions[rows]
    tok_id = all_tokens[tok_ctx, tok_pos].astype(np.int64)
    domain_names = sorted({all_domains[c] for c in chosen})
    dom_index = {d: i for i, d in enumerate(domain_names)}
    tok_dom = np.array([dom_index[all_domains[c]] for c in tok_ctx], dtype=np.int64)
    D = len(domain_names)
    vocab, tok_vocab = np.unique(tok_id, return_inverse=True)  # compact vocabulary of analysis tokens
    tok_dom_t, tok_vocab_t = torch.from_numpy(tok_dom), torch.from_numpy(tok_vocab.astype(np.int64))

    # ---- per-SAE state ---------------------------------------------------------------------
    tmpdir = tempfile.TemporaryDirectory(prefix="moesae-analyze-", dir=db_path.parent if db_path.parent.exists() else None)
    states = []
    for name, sae, _meta in runs:
        if sae.cfg.d_in != acts.d_in:
            raise DataError(
                f"SAE '{name}' reads width {sae.cfg.d_in} but the activations have width {acts.d_in}."
            )
        if sae.cfg.arch not in ("topk", "switch", "scale"):
            raise ConfigError(
                f"SAE '{name}' is an imported {sae.cfg.arch} SAE; the analysis reads TopK-style "
                "codes (topk, switch, scale) only."
            )
        sae.eval()
        cfg = sae.cfg
        moe = cfg.experts > 1
        spill_v = np.lib.format.open_memmap(Path(tmpdir.name) / f"{len(states)}-v.npy", "w+", np.float32, (n_tok, cfg.k))
        spill_i = np.lib.format.open_memmap(Path(tmpdir.name) / f"{len(states)}-i.npy", "w+", np.int32, (n_tok, cfg.k))
        states.append({
            "name": name, "sae": sae, "moe": moe,
            "stats": FeatureStats(cfg.width, D, top_k, hist_bins),
            "routing": RoutingStats(cfg.experts, cfg.active, D, len(vocab), n_tok) if moe else None,
            "spill_v": spill_v, "spill_i": spill_i, "sae_seconds": 0.0, "stat_seconds": 0.0,
            "context_len": int(all_tokens.shape[1]),
        })

    # ---- pass 1: encode every chunk with every SAE ------------------------------------------
    bar = _bar(n_tok, "analyse", progress)
    read_seconds = 0.0
    try:
        for s in range(0, n_tok, chunk_tokens):
            e = min(n_tok, s + chunk_tokens)
            t0 = time.perf_counter()
            x_raw = torch.from_numpy(np.ascontiguousarray(ev.read(rows[s:e]), dtype=np.float32))
            if not torch.isfinite(x_raw).all():
                raise DataError("The activation store holds NaN or infinite values; harvest again.")
            read_seconds += time.perf_counter() - t0
            tok = torch.arange(s, e)
            for st in states:
                sae = st["sae"]
                t0 = time.perf_counter()
                with torch.no_grad():
                    x = sae.normalise(x_raw.to(sae.W_dec.device, sae.W_dec.dtype))
                    codes = sae.encode(x)
                top_acts = codes.top_acts.detach().float().cpu()
                top_idx = codes.top_indices.detach().cpu()
                t1 = time.perf_counter()
                st["sae_seconds"] += t1 - t0
                st["stats"].update(top_acts, top_idx, tok, tok_dom_t[s:e])
                if st["routing"] is not None:
                    st["routing"].update(_cpu(codes), tok, tok_dom_t[s:e], tok_vocab_t[s:e])
                st["spill_v"][s:e] = top_acts.numpy()
                st["spill_i"][s:e] = top_idx.numpy()
                st["stat_seconds"] += time.perf_counter() - t1
            bar.update(e - s)
        bar.close()

        # ---- token strings (decoded once per distinct id) -------------------------------------
        ctx_tokens = all_tokens[chosen]
        ids_needed = np.unique(np.concatenate([ctx_tokens.reshape(-1), vocab]))
        strs = model.token_strs([int(i) for i in ids_needed])
        tok_str = dict(zip(ids_needed.tolist(), strs, strict=True))

        meta = {"build_hash": build_hash or "", "analysis_seconds": "", "n_tokens": str(n_tok),
                "model": getattr(model, "name", "") or "", "hook": getattr(acts, "hook", "") or ""}
        with BuildWriter(db_path, meta={k: v for k, v in meta.items() if k != "analysis_seconds"}) as w:
            w.insert("models", {
                "name": [getattr(model, "name", "") or getattr(acts, "model_name", "")],
                "hook": [getattr(acts, "hook", "")],
                "d_model": np.array([getattr(model, "d_model", acts.d_in)]),
                "n_layers": np.array([getattr(model, "n_layers", 0) or 0]),
                "info": [json.dumps({"activations": str(getattr(acts, "path", "")),
                                     "norm_scale": float(getattr(acts, "norm_scale", 1.0) or 1.0)})],
            })
            w.insert("contexts", {
                "id": chosen.astype(np.int32),
                "domain": [all_domains[c] for c in chosen],
                "token_ids": ctx_tokens.astype(np.int32),
                "tokens": [[tok_str[int(t)] for t in row] for row in ctx_tokens],
            })
            timing = {}
            for st in states:
                timing[st["name"]] = _write_sae(
                    w, st, runs, model, acts, tok_ctx, tok_pos, tok_id, vocab, domain_names,
                    tok_str, chosen, bands, per_band, n_neighbours, dup_threshold, max_pairs,
                    n_logits, umap, clusters, seed, metrics, training_logs, chunk_tokens, progress,
                )
            total = time.perf_counter() - t_start
            w.execute("INSERT INTO meta VALUES ('analysis_seconds', ?)", [f"{total:.1f}"])
            w.execute("INSERT INTO meta VALUES ('timing', ?)", [json.dumps({
                "read_seconds": round(read_seconds, 3), "per_sae": timing})])
    finally:
        for st in states:
            st.pop("spill_v", None)
            st.pop("spill_i", None)
        tmpdir.cleanup()
    return db_path


def _write_sae(w: BuildWriter, st, runs, model, acts, tok_ctx, tok_pos, tok_id, vocab, domain_names,
               tok_str, chosen, bands, per_band, n_neighbours, dup_threshold, max_pairs, n_logits,
               use_umap, clusters, seed, metrics, training_logs, chunk_tokens, progress) -> dict:
    name, sae, stats = st["name"], st["sae"], st["stats"]
    cfg = sae.cfg
    M, N, m = cfg.width, cfg.experts, cfg.expert_width
    n_tok = stats.n_tokens
    sae_meta = next(meta for n, _s, meta in runs if n == name)
    timing = {"encode_seconds": round(st["sae_seconds"], 3), "stats_seconds": round(st["stat_seconds"], 3)}
    t0 = time.perf_counter()

    # ---- pass 2 over the spilled codes: quantile-band samples ---------------------------------
    sampler = BandSampler(stats.max, bands, per_band, seed)
    for s in range(0, n_tok, chunk_tokens * 4):
        e = min(n_tok, s + chunk_tokens * 4)
        sampler.update(torch.from_numpy(np.asarray(st["spill_v"][s:e])),
                       torch.from_numpy(np.asarray(st["spill_i"][s:e]).astype(np.int64)),
                       torch.arange(s, e))
    timing["bands_seconds"] = round(time.perf_counter() - t0, 3)

    # ---- features table ---------------------------------------------------------------------
    expert_of = sae.feature_expert().cpu()
    n_fires = stats.n_fires
    dens = n_fires.double() / max(n_tok, 1)
    mean_act = torch.where(n_fires > 0, stats.sum / n_fires.clamp_min(1), torch.zeros_like(stats.sum))
    dom = stats.domain_counts()
    top_tok = stats.top_tok.numpy()
    top_strings = []
    for f in range(M):
        ids = top_tok[f][top_tok[f] >= 0]
        common = Counter(tok_str[int(tok_id[t])].strip() or repr(tok_str[int(tok_id[t])]) for t in ids)
        top_strings.append(" · ".join(t for t, _ in common.most_common(3)))
    dom_np = dom.numpy()
    pref = [domain_names[int(dom_np[f].argmax())] if n_fires[f] > 0 and domain_names else None
            for f in range(M)]
    dom_json = [json.dumps({domain_names[j]: int(dom_np[f, j]) for j in np.nonzero(dom_np[f])[0]})
                for f in range(M)]

    t0 = time.perf_counter()
    geo = decoder_neighbours(sae.W_dec, expert_of, N, n_neighbours, dup_threshold, max_pairs=max_pairs)
    timing["neighbours_seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    xy, map_method = map_coordinates(sae.W_dec, use_umap, seed)
    timing["map_seconds"] = round(time.perf_counter() - t0, 3)
    if clusters is None:
        labels = np.full(M, -1, np.int32)
    else:
        labels = spherical_kmeans(sae.W_dec, clusters or max(2, round(math.sqrt(M / 2))), seed)
    t0 = time.perf_counter()
    logits = logit_effects(sae.W_dec, model, n_logits)
    timing["logits_seconds"] = round(time.perf_counter() - t0, 3)
    cols: dict[str, Any] = {
        "sae": [name] * M, "feature": np.arange(M, dtype=np.int32),
        "expert": expert_of.numpy().astype(np.int32), "n_fires": n_fires.numpy(),
        "density": dens.numpy(), "mean_act": mean_act.numpy(), "max_act": stats.max.double().numpy(),
        "x": xy[:, 0], "y": xy[:, 1], "cluster": labels,
        "max_cos": geo["max_cos"].numpy().astype(np.float32), "top_tokens": top_strings,
        "preferred_domain": pref, "domain_counts": dom_json, "hist": stats.hist_counts().numpy(),
    }
    if logits is not None:
        pv, pi, nv, ni = logits
        pos_ids, neg_ids = pi.numpy(), ni.numpy()
        need = np.unique(np.concatenate([pos_ids.reshape(-1), neg_ids.reshape(-1)]))
        need_missing = [int(i) for i in need if int(i) not in tok_str]
        if need_missing:
            tok_str.update(zip(need_missing, model.token_strs(need_missing), strict=True))
        cols["logit_pos"] = [[tok_str[int(i)] for i in r] for r in pos_ids]
        cols["logit_pos_val"] = pv.numpy()
        cols["logit_neg"] = [[tok_str[int(i)] for i in r] for r in neg_ids]
        cols["logit_neg_val"] = nv.numpy()
    w.insert("features", cols)

    k_nb = geo["nbr_idx"].shape[1]
    if k_nb:
        w.insert("neighbours", {
            "sae": [name] * (M * k_nb), "feature": np.repeat(np.arange(M, dtype=np.int32), k_nb),
            "rank": np.tile(np.arange(k_nb, dtype=np.int16), M),
            "other": geo["nbr_idx"].numpy().reshape(-1).astype(np.int32),
            "cos": geo["nbr_cos"].numpy().reshape(-1).astype(np.float32),
        })
    a, b, c = geo["pairs"]
    ea, eb = expert_of[a].numpy(), expert_of[b].numpy()
    w.insert("duplicate_pairs", {
        "sae": [name] * len(a), "a": a.numpy().astype(np.int32), "b": b.numpy().astype(np.int32),
        "cos": c.numpy().astype(np.float32), "expert_a": ea.astype(np.int32),
        "expert_b": eb.astype(np.int32), "within": ea == eb,
    })
    sim = geo["expert_sim"].numpy()
    ii, jj = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    w.insert("expert_similarity", {"sae": [name] * (N * N), "i": ii.reshape(-1).astype(np.int32),
                                   "j": jj.reshape(-1).astype(np.int32), "value": sim.reshape(-1).astype(np.float64)})

    # ---- bands ----------------------------------------------------------------------------
    mx = stats.max.double().numpy()
    bi = np.arange(bands)
    band_n = sampler.counts.view(M, bands).numpy()
    share = band_n / np.maximum(n_fires.numpy()[:, None], 1)
    fired = n_fires.numpy() > 0
    fb = np.repeat(np.nonzero(fired)[0], bands)
    w.insert("bands", {
        "sae": [name] * len(fb), "feature": fb.astype(np.int32),
        "band": np.tile(bi, fired.sum()).astype(np.int16),
        "lo": (mx[fb] * np.tile(bi, fired.sum()) / bands).astype(np.float32),
        "hi": (mx[fb] * (np.tile(bi, fired.sum()) + 1) / bands).astype(np.float32),
        "n": band_n[fired].reshape(-1), "share": share[fired].reshape(-1),
    })

    # ---- examples: top-k and band samples with activations over their whole context -------------
    t0 = time.perf_counter()
    top_t = stats.top_tok.numpy()
    top_v = stats.top_val.numpy()
    tf, tr = np.nonzero(top_t >= 0)
    samp = sampler.samples().numpy()
    sf, sb, sr = np.nonzero(samp >= 0)
    ex_feat = np.concatenate([tf, sf]).astype(np.int64)
    ex_tok = np.concatenate([top_t[tf, tr], samp[sf, sb, sr]]).astype(np.int64)
    ex_kind = np.concatenate([np.zeros(len(tf), bool), np.ones(len(sf), bool)])
    ex_band = np.concatenate([np.full(len(tf), -1), sb]).astype(np.int16)
    ex_rank = np.concatenate([tr, sr]).astype(np.int16)
    if len(sf):  # the sampled token's activation of f, read back from the spilled codes
        st_tok = samp[sf, sb, sr]
        order = np.argsort(st_tok, kind="stable")
        sv = np.asarray(st["spill_v"][st_tok[order]])
        si = np.asarray(st["spill_i"][st_tok[order]])
        samp_act = np.empty(len(sf), np.float32)
        samp_act[order] = np.where(si == sf[order, None], sv, 0).max(1)
    else:
        samp_act = np.zeros(0, np.float32)
    ex_act = np.concatenate([top_v[tf, tr], samp_act]).astype(np.float32)
    if len(sf):
        key = np.lexsort((-samp_act, sb, sf))
        ranks = np.empty(len(sf), np.int16)
        grp = sf[key] * bands + sb[key]
        starts = np.r_[0, np.nonzero(np.diff(grp))[0] + 1]
        r = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
        ranks[key] = r
        ex_rank[len(tf):] = ranks
    _write_examples(w, name, st, M, ex_feat, ex_tok, ex_kind, ex_band, ex_rank, ex_act, tok_ctx, tok_pos)
    timing["examples_seconds"] = round(time.perf_counter() - t0, 3)

    # ---- experts and routing ------------------------------------------------------------------
    omega = getattr(sae, "omega", None)
    alive = np.bincount(expert_of.numpy(), weights=(n_fires.numpy() > 0), minlength=N)
    load_entropy = None
    rt = st["routing"]
    if rt is not None:
        top1 = rt.top1.view(-1, N).numpy()
        topk = rt.topk.view(-1, N).numpy()
        total1 = top1.sum(0)
        load1 = total1 / max(n_tok, 1)
        loadk = topk.sum(0) / max(n_tok * cfg.active, 1)
        nz = load1[load1 > 0]
        load_entropy = float(-(nz * np.log(nz)).sum() / math.log(N)) if N > 1 else 0.0
        conf = rt.conf.numpy() / np.maximum(total1, 1)
        router_ent = np.where(total1 > 0, rt.entropy.numpy() / np.maximum(total1, 1), np.nan)
        dshare = top1 / np.maximum(total1[None, :], 1)  # [D, N]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -(np.where(dshare > 0, dshare * np.log(dshare), 0)).sum(0)
        dom_ent = ent / math.log(len(domain_names)) if len(domain_names) > 1 else np.zeros(N)
        tc = rt.tok_counts.view(N, -1).numpy()
        tok_total = np.maximum(tc.sum(0), 1)
        top_tokens = []
        for i in range(N):
            order = np.argsort(-tc[i], kind="stable")[:20]
            top_tokens.append(json.dumps([
                {"token": tok_str[int(vocab[j])], "count": int(tc[i, j]), "share": float(tc[i, j] / tok_total[j])}
                for j in order if tc[i, j] > 0]))
        dom_tokens = top1.sum(1)
        rows_d, rows_e = np.meshgrid(np.arange(len(domain_names)), np.arange(N), indexing="ij")
        w.insert("expert_domain_load", {
            "sae": [name] * (len(domain_names) * N), "expert": rows_e.reshape(-1).astype(np.int32),
            "domain": [domain_names[d] for d in rows_d.reshape(-1)],
            "n_tokens": np.repeat(dom_tokens, N),
            "load_top1": (top1 / np.maximum(dom_tokens[:, None], 1)).reshape(-1),
            "load_topk": (topk / np.maximum(dom_tokens[:, None] * cfg.active, 1)).reshape(-1),
        })
        # routing per analysis context, flattened [L · e] with -1 at dropped positions
        L = st["context_len"]
        ctx_row = np.searchsorted(chosen, tok_ctx)
        ex_grid = np.full((len(chosen), L, cfg.active), -1, np.int16)
        wt_grid = np.zeros((len(chosen), L, cfg.active), np.float32)
        ex_grid[ctx_row, tok_pos] = rt.experts
        wt_grid[ctx_row, tok_pos] = rt.weights
        w.insert("routing", {"sae": [name] * len(chosen), "context": chosen.astype(np.int32),
                             "experts": ex_grid.reshape(len(chosen), -1),
                             "weights": wt_grid.reshape(len(chosen), -1)})
    else:
        load1 = loadk = np.ones(N)
        conf = np.full(N, np.nan)
        router_ent = np.full(N, np.nan)
        dom_ent = np.full(N, np.nan)
        top_tokens = ["[]"] * N
    w.insert("experts", {
        "sae": [name] * N, "expert": np.arange(N, dtype=np.int32), "n_features": np.full(N, m, np.int32),
        "n_alive": alive.astype(np.int32), "load_top1": np.asarray(load1, np.float64),
        "load_topk": np.asarray(loadk, np.float64),
        "omega": omega.detach().float().cpu().numpy().astype(np.float64) if omega is not None else [None] * N,
        "mean_confidence": np.asarray(conf, np.float64),
        "router_entropy": np.asarray(router_ent, np.float64),
        "domain_entropy": np.asarray(dom_ent, np.float64),
        "top_tokens": top_tokens,
    })

    config = dict(sae_meta)
    config.setdefault("sae", cfg.to_dict())
    config["input_scale"] = float(sae.input_scale)
    w.insert("saes", {
        "sae": [name], "model": [str(sae_meta.get("model") or getattr(acts, "model_name", ""))],
        "hook": [str(sae_meta.get("hook") or getattr(acts, "hook", ""))], "arch": [cfg.arch],
        "width": np.array([M]), "experts": np.array([N]), "active": np.array([cfg.active]),
        "k": np.array([cfg.k]), "config": [json.dumps(config, default=str)],
        "metrics": [json.dumps(metrics.get(name, {}), default=_json_default)],
        "training_log": [json.dumps(training_logs.get(name, []), default=_json_default)],
        "n_tokens": np.array([n_tok]), "n_contexts": np.array([len(chosen)]),
        "hist_edges": stats.edges.numpy()[None, :], "load_entropy": [load_entropy],
        "map_method": [map_method], "logit_note": [LOGIT_NOTE if logits is not None else
                                                   "The model has no LM head: no logit effects."],
    })
    return timing


def _write_examples(w, name, st, M, ex_feat, ex_tok, ex_kind, ex_band, ex_rank, ex_act, tok_ctx, tok_pos,
                    batch_contexts: int = 256) -> None:
    """Cut each example's activations over its context out of the spilled codes, by context batch."""
    ex_ctx = tok_ctx[ex_tok]
    ctx_list = np.unique(ex_ctx)
    # analysis tokens are sorted by (context, position): each context is one contiguous range
    starts = np.searchsorted(tok_ctx, ctx_list, side="left")
    ends = np.searchsorted(tok_ctx, ctx_list, side="right")
    spill_v, spill_i = st["spill_v"], st["spill_i"]
    for b0 in range(0, len(ctx_list), batch_contexts):
        cs = ctx_list[b0 : b0 + batch_contexts]
        sel = np.nonzero(np.isin(ex_ctx, cs))[0]
        if not len(sel):
            continue
        local = np.searchsorted(cs, ex_ctx[sel])
        need_key = local.astype(np.int64) * M + ex_feat[sel]
        tok_ranges = [np.arange(starts[b0 + j], ends[b0 + j]) for j in range(len(cs))]
        toks = np.concatenate(tok_ranges)
        tok_local = np.repeat(np.arange(len(cs)), [len(r) for r in tok_ranges])
        v = np.asarray(spill_v[toks])
        idx = np.asarray(spill_i[toks])
        k = v.shape[1]
        occ_key = (np.repeat(tok_local, k).astype(np.int64) * M + idx.reshape(-1))
        occ_pos = np.repeat(tok_pos[toks], k)
        occ_val = v.reshape(-1)
        live = occ_val > 0
        occ_key, occ_pos, occ_val = occ_key[live], occ_pos[live], occ_val[live]
        order = np.argsort(occ_key, kind="stable")
        occ_key, occ_pos, occ_val = occ_key[order], occ_pos[order], occ_val[order]
        lo = np.searchsorted(occ_key, need_key, "left")
        hi = np.searchsorted(occ_key, need_key, "right")
        lengths = hi - lo
        gather = np.repeat(lo - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
        w.insert("examples", {
            "sae": [name] * len(sel), "feature": ex_feat[sel].astype(np.int32),
            "kind": np.where(ex_kind[sel], "band", "top").tolist(), "band": ex_band[sel],
            "rank": ex_rank[sel], "context": ex_ctx[sel].astype(np.int32),
            "position": tok_pos[ex_tok[sel]].astype(np.int16), "activation": ex_act[sel],
            "act_pos": ragged_list_column(occ_pos[gather].astype(np.int16), lengths),
            "act_val": ragged_list_column(occ_val[gather].astype(np.float32), lengths),
        })


def _cpu(codes):
    return type(codes)(*[c.detach().cpu() if isinstance(c, Tensor) else c for c in codes])


def _json_default(o):
    if isinstance(o, Tensor | np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                disable=not progress)
