"""Examples of each feature: its top activations and uniform samples per quantile band, each
with the feature's activation over the whole context.

Band edges are fractions of each feature's maximum, known only after the first pass, so a
second, cheap pass reads only the spilled codes (no model, no encoder) to reservoir-sample
the bands; then each example's activations over its context are cut out of the spill too.
Both stay bounded in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from ..store import ragged_list_column
from .state import SAEPass
from .stats import BandSampler
from .tokens import AnalysisTokens


def sample_bands(p: SAEPass, bands: int, per_band: int, seed: int, chunk_tokens: int) -> BandSampler:
    """Pass 2 over the spilled codes: a uniform sample of tokens per (feature, band)."""
    sampler = BandSampler(p.stats.max, bands, per_band, seed)
    n_tok = p.stats.n_tokens
    for s in range(0, n_tok, chunk_tokens * 4):
        e = min(n_tok, s + chunk_tokens * 4)
        sampler.update(torch.from_numpy(np.asarray(p.spill_v[s:e])),
                       torch.from_numpy(np.asarray(p.spill_i[s:e]).astype(np.int64)),
                       torch.arange(s, e))
    return sampler


def write_examples(w, p: SAEPass, sampler: BandSampler, tokens: AnalysisTokens, bands: int) -> None:
    """The `examples` table: top examples (kind 'top') and band samples (kind 'band')."""
    M = p.sae.cfg.width
    top_t = p.stats.top_tok.numpy()
    top_v = p.stats.top_val.numpy()
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
        sv = np.asarray(p.spill_v[st_tok[order]])
        si = np.asarray(p.spill_i[st_tok[order]])
        samp_act = np.empty(len(sf), np.float32)
        samp_act[order] = np.where(si == sf[order, None], sv, 0).max(1)
    else:
        samp_act = np.zeros(0, np.float32)
    ex_act = np.concatenate([top_v[tf, tr], samp_act]).astype(np.float32)
    if len(sf):  # rank band samples by activation within their (feature, band)
        key = np.lexsort((-samp_act, sb, sf))
        ranks = np.empty(len(sf), np.int16)
        grp = sf[key] * bands + sb[key]
        starts = np.r_[0, np.nonzero(np.diff(grp))[0] + 1]
        r = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
        ranks[key] = r
        ex_rank[len(tf):] = ranks
    _write_with_contexts(w, p, M, ex_feat, ex_tok, ex_kind, ex_band, ex_rank, ex_act, tokens)


def _write_with_contexts(w, p: SAEPass, M, ex_feat, ex_tok, ex_kind, ex_band, ex_rank, ex_act,
                         tokens: AnalysisTokens, batch_contexts: int = 256) -> None:
    """Cut each example's activations over its context out of the spilled codes, by context batch."""
    tok_ctx, tok_pos = tokens.ctx, tokens.pos
    ex_ctx = tok_ctx[ex_tok]
    ctx_list = np.unique(ex_ctx)
    # analysis tokens are sorted by (context, position): each context is one contiguous range
    starts = np.searchsorted(tok_ctx, ctx_list, side="left")
    ends = np.searchsorted(tok_ctx, ctx_list, side="right")
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
        v = np.asarray(p.spill_v[toks])
        idx = np.asarray(p.spill_i[toks])
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
            "sae": [p.name] * len(sel), "feature": ex_feat[sel].astype(np.int32),
            "kind": np.where(ex_kind[sel], "band", "top").tolist(), "band": ex_band[sel],
            "rank": ex_rank[sel], "context": ex_ctx[sel].astype(np.int32),
            "position": tok_pos[ex_tok[sel]].astype(np.int16), "activation": ex_act[sel],
            "act_pos": ragged_list_column(occ_pos[gather].astype(np.int16), lengths),
            "act_val": ragged_list_column(occ_val[gather].astype(np.float32), lengths),
        })
