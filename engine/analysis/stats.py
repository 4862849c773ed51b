"""Running per-feature and per-expert statistics over a stream of sparse codes, with
vectorised torch ops: memory is O(M · top_k + M · bins) per SAE, whatever the number of tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

HIST_RANGE = (1e-3, 1e3)
"""Shared log-spaced histogram range (normalised-space activations); values outside land in
the first / last bin, so counts always sum to the number of firings."""

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
