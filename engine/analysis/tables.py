"""The rows one SAE contributes to a build: features, neighbours, duplicate pairs, expert
similarity, quantile bands, experts and routing, and its `saes` row."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
from torch import Tensor

from ..metrics.geometry import DecoderGeometry, expert_similarity, max_cosine
from ..metrics.load import load_entropy
from .compare import expert_correspondence, match_features
from .logits import LOGIT_NOTE
from .state import SAEPass
from .stats import BandSampler
from .tokens import AnalysisTokens


def _label(s: str) -> str:
    return s.strip() or repr(s)


def write_features(w, p: SAEPass, tokens: AnalysisTokens, geo: DecoderGeometry, xy: np.ndarray,
                   clusters: np.ndarray, logits: tuple[Tensor, ...] | None) -> None:
    stats, M = p.stats, p.sae.cfg.width
    n_fires = stats.n_fires
    dens = n_fires.double() / max(stats.n_tokens, 1)
    mean_act = np.where(n_fires.numpy() > 0,
                        (stats.sum / n_fires.clamp_min(1)).numpy(), 0.0)
    top_tok = stats.top_tok.numpy()
    strings = tokens.strings
    top_strings = []
    for f in range(M):
        ids = top_tok[f][top_tok[f] >= 0]
        common = Counter(_label(strings[int(tokens.token_id[t])]) for t in ids)
        top_strings.append(" · ".join(t for t, _ in common.most_common(3)))
    dom = stats.domain_counts().numpy()
    names = tokens.domain_names
    pref = [names[int(dom[f].argmax())] if n_fires[f] > 0 and names else None for f in range(M)]
    dom_json = [json.dumps({names[j]: int(dom[f, j]) for j in np.nonzero(dom[f])[0]}) for f in range(M)]
    cols = {
        "sae": [p.name] * M, "feature": np.arange(M, dtype=np.int32),
        "expert": geo.expert_of.cpu().numpy().astype(np.int32), "n_fires": n_fires.numpy(),
        "density": dens.numpy(), "mean_act": mean_act, "max_act": stats.max.double().numpy(),
        "x": xy[:, 0], "y": xy[:, 1], "cluster": clusters,
        "max_cos": max_cosine(geo).overall.cpu().numpy().astype(np.float32), "top_tokens": top_strings,
        "preferred_domain": pref, "domain_counts": dom_json, "hist": stats.hist_counts().numpy(),
    }
    if logits is not None:
        pv, pi, nv, ni = logits
        cols["logit_pos"] = [[strings[int(i)] for i in r] for r in pi.numpy()]
        cols["logit_pos_val"] = pv.numpy()
        cols["logit_neg"] = [[strings[int(i)] for i in r] for r in ni.numpy()]
        cols["logit_neg_val"] = nv.numpy()
    w.insert("features", cols)


def write_geometry(w, p: SAEPass, geo: DecoderGeometry) -> None:
    """Neighbours, duplicate pairs (with their within/across label) and expert similarity."""
    M, N = p.sae.cfg.width, p.sae.cfg.experts
    expert_of = geo.expert_of.cpu()
    k_nb = geo.nbr_idx.shape[1]
    if k_nb:
        w.insert("neighbours", {
            "sae": [p.name] * (M * k_nb), "feature": np.repeat(np.arange(M, dtype=np.int32), k_nb),
            "rank": np.tile(np.arange(k_nb, dtype=np.int16), M),
            "other": geo.nbr_idx.cpu().numpy().reshape(-1).astype(np.int32),
            "cos": geo.nbr_cos.cpu().numpy().reshape(-1).astype(np.float32),
        })
    a, b, c = (t.cpu() for t in geo.pairs)
    ea, eb = expert_of[a].numpy(), expert_of[b].numpy()
    w.insert("duplicate_pairs", {
        "sae": [p.name] * len(a), "a": a.numpy().astype(np.int32), "b": b.numpy().astype(np.int32),
        "cos": c.numpy().astype(np.float32), "expert_a": ea.astype(np.int32),
        "expert_b": eb.astype(np.int32), "within": ea == eb,
    })
    sim = expert_similarity(geo).cpu().numpy()
    ii, jj = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    w.insert("expert_similarity", {
        "sae": [p.name] * (N * N), "i": ii.reshape(-1).astype(np.int32),
        "j": jj.reshape(-1).astype(np.int32), "value": sim.reshape(-1).astype(np.float64),
    })


def write_bands(w, p: SAEPass, sampler: BandSampler, bands: int) -> None:
    M = p.sae.cfg.width
    n_fires = p.stats.n_fires.numpy()
    mx = p.stats.max.double().numpy()
    bi = np.arange(bands)
    band_n = sampler.counts.view(M, bands).numpy()
    share = band_n / np.maximum(n_fires[:, None], 1)
    fired = n_fires > 0
    fb = np.repeat(np.nonzero(fired)[0], bands)
    w.insert("bands", {
        "sae": [p.name] * len(fb), "feature": fb.astype(np.int32),
        "band": np.tile(bi, fired.sum()).astype(np.int16),
        "lo": (mx[fb] * np.tile(bi, fired.sum()) / bands).astype(np.float32),
        "hi": (mx[fb] * (np.tile(bi, fired.sum()) + 1) / bands).astype(np.float32),
        "n": band_n[fired].reshape(-1), "share": share[fired].reshape(-1),
    })


def write_experts(w, p: SAEPass, tokens: AnalysisTokens, expert_of: np.ndarray) -> float | None:
    """The `experts`, `expert_domain_load` and `routing` tables; returns the top-1 load entropy."""
    cfg = p.sae.cfg
    N, m, n_tok = cfg.experts, cfg.expert_width, p.stats.n_tokens
    n_fires = p.stats.n_fires.numpy()
    omega = getattr(p.sae, "omega", None)
    alive = np.bincount(expert_of, weights=(n_fires > 0), minlength=N)
    entropy = None
    rt = p.routing
    names = tokens.domain_names
    if rt is not None:
        top1 = rt.top1.view(-1, N).numpy()
        topk = rt.topk.view(-1, N).numpy()
        total1 = top1.sum(0)
        load1 = total1 / max(n_tok, 1)
        loadk = topk.sum(0) / max(n_tok * cfg.active, 1)
        entropy = load_entropy(load1) if N > 1 else 0.0
        conf = rt.conf.numpy() / np.maximum(total1, 1)
        router_ent = np.where(total1 > 0, rt.entropy.numpy() / np.maximum(total1, 1), np.nan)
        dshare = top1 / np.maximum(total1[None, :], 1)  # [D, N]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -(np.where(dshare > 0, dshare * np.log(dshare), 0)).sum(0)
        dom_ent = ent / math.log(len(names)) if len(names) > 1 else np.zeros(N)
        tc = rt.tok_counts.view(N, -1).numpy()
        tok_total = np.maximum(tc.sum(0), 1)
        top_tokens = []
        for i in range(N):
            order = np.argsort(-tc[i], kind="stable")[:20]
            top_tokens.append(json.dumps([
                {"token": tokens.strings[int(tokens.vocab[j])], "count": int(tc[i, j]),
                 "share": float(tc[i, j] / tok_total[j])}
                for j in order if tc[i, j] > 0]))
        dom_tokens = top1.sum(1)
        rows_d, rows_e = np.meshgrid(np.arange(len(names)), np.arange(N), indexing="ij")
        w.insert("expert_domain_load", {
            "sae": [p.name] * (len(names) * N), "expert": rows_e.reshape(-1).astype(np.int32),
            "domain": [names[d] for d in rows_d.reshape(-1)],
            "n_tokens": np.repeat(dom_tokens, N),
            "load_top1": (top1 / np.maximum(dom_tokens[:, None], 1)).reshape(-1),
            "load_topk": (topk / np.maximum(dom_tokens[:, None] * cfg.active, 1)).reshape(-1),
        })
        # routing per analysis context, flattened [L · e] with -1 at dropped positions
        chosen, L = tokens.chosen, tokens.context_len
        ctx_row = np.searchsorted(chosen, tokens.ctx)
        ex_grid = np.full((len(chosen), L, cfg.active), -1, np.int16)
        wt_grid = np.zeros((len(chosen), L, cfg.active), np.float32)
        ex_grid[ctx_row, tokens.pos] = rt.experts
        wt_grid[ctx_row, tokens.pos] = rt.weights
        w.insert("routing", {"sae": [p.name] * len(chosen), "context": chosen.astype(np.int32),
                             "experts": ex_grid.reshape(len(chosen), -1),
                             "weights": wt_grid.reshape(len(chosen), -1)})
    else:
        load1 = loadk = np.ones(N)
        conf = router_ent = dom_ent = np.full(N, np.nan)
        top_tokens = ["[]"] * N
    w.insert("experts", {
        "sae": [p.name] * N, "expert": np.arange(N, dtype=np.int32), "n_features": np.full(N, m, np.int32),
        "n_alive": alive.astype(np.int32), "load_top1": np.asarray(load1, np.float64),
        "load_topk": np.asarray(loadk, np.float64),
        "omega": omega.detach().float().cpu().numpy().astype(np.float64) if omega is not None else [None] * N,
        "mean_confidence": np.asarray(conf, np.float64),
        "router_entropy": np.asarray(router_ent, np.float64),
        "domain_entropy": np.asarray(dom_ent, np.float64),
        "top_tokens": top_tokens,
    })
    return entropy


def write_sae_row(w, p: SAEPass, acts, n_contexts: int, metrics: dict, training_log: list,
                  entropy: float | None, map_method: str, has_logits: bool) -> None:
    cfg = p.sae.cfg
    config = dict(p.meta)
    config.setdefault("sae", cfg.to_dict())
    config["input_scale"] = float(p.sae.input_scale)
    w.insert("saes", {
        "sae": [p.name], "model": [str(p.meta.get("model") or getattr(acts, "model_name", ""))],
        "hook": [str(p.meta.get("hook") or getattr(acts, "hook", ""))], "arch": [cfg.arch],
        "width": np.array([cfg.width]), "experts": np.array([cfg.experts]),
        "active": np.array([cfg.active]), "k": np.array([cfg.k]),
        "config": [json.dumps(config, default=str)],
        "metrics": [json.dumps(metrics, default=json_default)],
        "training_log": [json.dumps(training_log, default=json_default)],
        "n_tokens": np.array([p.stats.n_tokens]), "n_contexts": np.array([n_contexts]),
        "hist_edges": p.stats.edges.numpy()[None, :], "load_entropy": [entropy],
        "map_method": [map_method],
        "logit_note": [LOGIT_NOTE if has_logits else "The model has no LM head: no logit effects."],
    })


def json_default(o):
    if isinstance(o, Tensor | np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


CODES_PER_TOKEN = 8
"""How many of each token's codes `context_codes` keeps (the strongest): what a page shows."""


def write_context_codes(w, p: SAEPass, tokens: AnalysisTokens) -> None:
    """Every analysed context's strongest codes, [L · c] per context (c = min(k,
    CODES_PER_TOKEN); feature −1 at dropped positions and where fewer fire)."""
    c = min(p.sae.cfg.k, CODES_PER_TOKEN)
    chosen, L = tokens.chosen, tokens.context_len
    row = np.searchsorted(chosen, tokens.ctx)
    feats = np.full((len(chosen), L, c), -1, np.int32)
    acts = np.zeros((len(chosen), L, c), np.float32)
    for s in range(0, tokens.n, 1 << 16):  # the spill is on disk: read it in slices
        e = min(tokens.n, s + (1 << 16))
        v, i = np.asarray(p.spill_v[s:e]), np.asarray(p.spill_i[s:e])
        top = np.argsort(-v, axis=1, kind="stable")[:, :c]
        v, i = np.take_along_axis(v, top, 1), np.take_along_axis(i, top, 1)
        feats[row[s:e], tokens.pos[s:e]] = np.where(v > 0, i, -1)
        acts[row[s:e], tokens.pos[s:e]] = np.maximum(v, 0)
    w.insert("context_codes", {"sae": [p.name] * len(chosen), "context": chosen.astype(np.int32),
                               "per_token": [c] * len(chosen),
                               "features": feats.reshape(len(chosen), -1),
                               "acts": acts.reshape(len(chosen), -1)})


def write_matches(w, a: SAEPass, b: SAEPass) -> None:
    """Two SAEs matched feature by feature, both directions (every SAE of an analysis encodes
    the same activations, so they share a model and hook)."""
    m = match_features(a.sae.W_dec, b.sae.W_dec)
    ea, eb = a.sae.feature_expert().cpu(), b.sae.feature_expert().cpu()
    for (x, y, near, near_cos, partner, partner_cos, ex, ey) in (
        (a, b, m.nearest_ab, m.nearest_ab_cos, m.partner_ab, m.partner_ab_cos, ea, eb),
        (b, a, m.nearest_ba, m.nearest_ba_cos, m.partner_ba, None, eb, ea),
    ):
        if partner_cos is None:  # the inverse matching's cosines, read from the other side
            pc = np.full(len(partner), np.nan, np.float32)
            has = partner.numpy() >= 0
            pc[has] = m.partner_ab_cos.numpy()[partner.numpy()[has]]
        else:
            pc = partner_cos.numpy()
        n = len(near)
        w.insert("feature_matches", {
            "sae": [x.name] * n, "other": [y.name] * n, "feature": np.arange(n, dtype=np.int32),
            "nearest": near.numpy().astype(np.int32), "nearest_cos": near_cos.numpy().astype(np.float32),
            "partner": partner.numpy().astype(np.int32), "partner_cos": pc.astype(np.float32),
        })
        share, mean = expert_correspondence(near, near_cos, ex, ey, x.sae.cfg.experts, y.sae.cfg.experts)
        ii, jj = np.meshgrid(np.arange(share.shape[0]), np.arange(share.shape[1]), indexing="ij")
        w.insert("expert_matches", {
            "sae": [x.name] * share.size, "other": [y.name] * share.size,
            "i": ii.reshape(-1).astype(np.int32), "j": jj.reshape(-1).astype(np.int32),
            "share": share.reshape(-1), "mean_cos": mean.reshape(-1),
        })
