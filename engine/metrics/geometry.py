"""The geometry of a decoder, in one blocked pass over its M × M cosine matrix.

Every decoder-only quantity the engine reports comes from `decoder_geometry`: each
feature's max cosine to the features of each expert (an [M, N] table, from which the overall,
within-expert and across-expert max cosines, the redundancy ratios and the expert × expert
similarity heatmap all follow, METHOD.md §4), and optionally each feature's nearest
neighbours and the most similar pairs. Memory is O(block · M), whatever the width.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import names


class DecoderGeometry(NamedTuple):
    per_expert: Tensor
    """[M, N] max cosine of each feature to the features of each expert (self excluded; −inf
    where an expert has no other feature)."""
    expert_of: Tensor
    """[M] the expert of each feature."""
    nbr_idx: Tensor
    """[M, k] nearest neighbours by cosine, highest first (k = 0 unless asked)."""
    nbr_cos: Tensor
    """[M, k] their cosines."""
    pairs: tuple[Tensor, Tensor, Tensor]
    """(a, b, cos) with a < b: the most similar pairs down to the asked threshold, highest
    first (empty unless asked)."""


class MaxCosine(NamedTuple):
    overall: Tensor
    """[M] each feature's max cosine to any other feature."""
    within: Tensor | None
    """[M] max cosine to another feature of the same expert (NaN if it is alone); None if one expert."""
    across: Tensor | None
    """[M] max cosine to a feature of another expert; None if one expert."""


def _auto_block(M: int) -> int:
    # Keep one [block, M] float32 similarity slab near 64 MB, whatever the width.
    return max(1, min(M, 2**24 // max(M, 1)))


@torch.no_grad()
def decoder_geometry(
    W_dec: Tensor,
    expert_of: Tensor | None = None,
    n_experts: int | None = None,
    neighbours: int = 0,
    pair_threshold: float | None = None,
    max_pairs: int = 200_000,
    block: int | None = None,
    min_pairs: int = 0,
) -> DecoderGeometry:
    """One pass over the cosine matrix of the unit-normalised decoder rows.

    `expert_of` [M] groups the features (None: one group); `neighbours` > 0 also keeps each
    feature's nearest features; `pair_threshold` also keeps the pairs at or above it (the
    `max_pairs` most similar ones, so memory stays bounded), and at least the `min_pairs` most
    similar pairs whatever their cosine.
    """
    W = W_dec.detach().float()
    M = W.shape[0]
    dev = W.device
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if expert_of is None:
        expert_of = torch.zeros(M, dtype=torch.long, device=dev)
        n_experts = 1
    expert_of = expert_of.to(dev).long()
    N = int(n_experts if n_experts is not None else int(expert_of.max()) + 1)
    block = block or _auto_block(M)
    # Our SAEs give expert i the contiguous rows [i·m, (i+1)·m): a reshape replaces the scatter.
    m = M // N
    contiguous = M == N * m and torch.equal(expert_of, torch.arange(M, device=dev) // m)
    k = max(0, min(neighbours, M - 1))
    per_expert = torch.empty(M, N, dtype=torch.float32, device=dev)
    nbr_idx = torch.empty(M, k, dtype=torch.long, device=dev)
    nbr_cos = torch.empty(M, k, device=dev)
    pa: list[Tensor] = []
    pb: list[Tensor] = []
    pc: list[Tensor] = []
    n_pairs = 0
    cols = torch.arange(M, device=dev)
    for start in range(0, M, block):
        stop = min(start + block, M)
        S = Wn[start:stop] @ Wn.T  # [b, M]
        rows = torch.arange(stop - start, device=dev)
        S[rows, rows + start] = -math.inf  # a feature is not its own neighbour
        if contiguous:
            per_expert[start:stop] = S.view(stop - start, N, m).amax(-1)
        else:
            slab = torch.full((stop - start, N), -math.inf, device=dev)
            idx = expert_of[None, :].expand(stop - start, M)
            per_expert[start:stop] = slab.scatter_reduce(1, idx, S, reduce="amax", include_self=True)
        if k:
            nbr_cos[start:stop], nbr_idx[start:stop] = S.topk(k, dim=1)
        if pair_threshold is not None:
            upper = cols[None, :] > (rows + start)[:, None]  # each pair once: a < b
            mask = (S >= pair_threshold) & upper
            if min_pairs:  # and this block's most similar pairs, whatever their cosine
                Su = torch.where(upper, S, torch.full_like(S, -math.inf)).reshape(-1)
                top = Su.topk(min(min_pairs, Su.numel())).indices
                top = top[torch.isfinite(Su[top])]
                mask.view(-1)[top] = True
            r, c = mask.nonzero(as_tuple=True)
            if r.numel():
                pa.append(r + start)
                pb.append(c)
                pc.append(S[r, c])
                n_pairs += r.numel()
                if n_pairs > 2 * max(max_pairs, min_pairs):  # memory stays bounded: prune
                    a_, b_, c_ = torch.cat(pa), torch.cat(pb), torch.cat(pc)
                    keep = max(max_pairs, min_pairs)
                    top = c_.topk(keep).indices
                    pa, pb, pc = [a_[top]], [b_[top]], [c_[top]]
                    n_pairs = keep
    if pa:
        a, b, c = torch.cat(pa), torch.cat(pb), torch.cat(pc)
        above = int((c >= pair_threshold).sum())
        keep = min(c.numel(), max(min(above, max_pairs), min_pairs))
        if c.numel() > keep:
            top = c.topk(keep).indices
            a, b, c = a[top], b[top], c[top]
        order = torch.argsort(c, descending=True)
        pairs = (a[order], b[order], c[order])
    else:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        pairs = (empty, empty, torch.zeros(0, device=dev))
    return DecoderGeometry(per_expert, expert_of, nbr_idx, nbr_cos, pairs)


def max_cosine(geo: DecoderGeometry) -> MaxCosine:
    """Per-feature max cosine overall, within its expert and across experts (METHOD §4)."""
    per_expert = geo.per_expert
    overall = _nan_if_inf(per_expert.amax(1))
    if per_expert.shape[1] == 1:
        return MaxCosine(overall, None, None)
    own = geo.expert_of[:, None]
    within = per_expert.gather(1, own).squeeze(1)
    across = per_expert.scatter(1, own, -math.inf).amax(1)
    return MaxCosine(overall, _nan_if_inf(within), _nan_if_inf(across))


def redundancy_ratio(maxcos: Tensor, tau: float) -> float:
    """Fraction of features whose max cosine is above τ (features without a partner excluded)."""
    valid = ~torch.isnan(maxcos)
    if not bool(valid.any()):
        return math.nan
    return float((maxcos[valid] > tau).float().mean())


def expert_similarity(geo: DecoderGeometry) -> Tensor:
    """[N, N]: [i, j] = mean over features of expert i of their max cosine to expert j's
    features (METHOD §4). The diagonal excludes self-pairs; an expert with a single feature
    has NaN on the diagonal."""
    N = geo.per_expert.shape[1]
    fe = geo.expert_of
    P = _nan_if_inf(geo.per_expert).double()
    sums = torch.zeros(N, N, dtype=torch.float64, device=P.device).index_add_(0, fe, P)
    counts = torch.bincount(fe, minlength=N).double()
    return (sums / counts[:, None]).float()


def redundancy_row_values(overall: Tensor) -> dict[str, float]:
    """mean max cosine and redundancy@τ for every τ, from per-feature max cosines."""
    out = {names.MEAN_MAX_COS: _nanmean(overall)}
    for tau in names.TAUS:
        out[names.redundancy(tau)] = redundancy_ratio(overall, tau)
    return out


def decoder_metrics(sae: Any, block: int | None = None) -> dict[str, Any]:
    """Redundancy (overall / within / across at each τ), mean max cosines and expert similarity."""
    N = sae.cfg.experts
    geo = decoder_geometry(sae.W_dec, sae.feature_expert() if N > 1 else None, N, block=block)
    mc = max_cosine(geo)
    # Dense TopK is a single expert: every pair is "within", none is "across".
    within = mc.within if mc.within is not None else mc.overall
    out: dict[str, Any] = {}
    for tau in names.TAUS:
        out[names.redundancy(tau)] = redundancy_ratio(mc.overall, tau)
        out[names.redundancy(tau, "within")] = redundancy_ratio(within, tau)
        out[names.redundancy(tau, "across")] = (
            redundancy_ratio(mc.across, tau) if mc.across is not None else None
        )
    out[names.mean_max_cos()] = _nanmean(mc.overall)
    out[names.mean_max_cos("within")] = _nanmean(within)
    out[names.mean_max_cos("across")] = _nanmean(mc.across) if mc.across is not None else None
    out[names.EXPERT_SIMILARITY] = expert_similarity(geo).tolist()
    return out


def _nan_if_inf(x: Tensor) -> Tensor:
    return torch.where(torch.isinf(x), torch.full_like(x, math.nan), x)


def _nanmean(x: Tensor) -> float:
    valid = x[~torch.isnan(x)]
    return float(valid.mean()) if valid.numel() else math.nan
