"""A synthetic but complete build (every table the explorer reads), written with
`engine.store.BuildWriter`: small for the tests, ≥ 50,000 features for the benchmark.

Features of one expert share a "theme" (a domain and a few words), so the pages show
structure: experts cluster on the map, domains route to experts, and a few deliberate
near-duplicate pairs across experts appear on the Redundancy page.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.store import BuildWriter, ragged_list_column

DOMAINS = ["pydoc", "fortunes", "bible"]
WORDS = {
    "pydoc": ["def", " return", " self", " None", " list", " int", "(", ")", ":", " import",
              " module", " <class>", " &", " dict"],
    "fortunes": [" love", " life", " money", " cat", " you", " never", " always", " joke",
                 " laugh", " wise", " fool", " \"quote\""],
    "bible": [" Lord", " God", " thee", " thou", " unto", " shall", " Israel", " king",
              " heaven", " earth", " said", " came"],
}
MODEL = "tiny-random"
HOOK = "blocks.1.hook_resid_post"


def make_build(
    path: str | Path,
    saes: tuple[tuple[str, str], ...] = (("switch", "switch"), ("scale-e2", "scale")),
    n_features: int = 256,
    n_experts: int = 8,
    n_contexts: int = 60,
    ctx_len: int = 32,
    checkpoints: dict[str, str] | None = None,
    seed: int = 0,
    top_k: int = 10,
    bands: int = 5,
    per_band: int = 3,
    hist_bins: int = 24,
    neighbours: int = 8,
) -> Path:
    """Write the build to `path` and return it. `checkpoints` maps an SAE name to a real
    checkpoint folder, recorded in its config (the Inspect-text page runs it)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    M, N, L = n_features, n_experts, ctx_len
    vocab = [w for d in DOMAINS for w in WORDS[d]]
    dom_of_word = {w: d for d in DOMAINS for w in WORDS[d]}

    # contexts: each one mostly from its domain's words
    ctx_dom = [DOMAINS[i % len(DOMAINS)] for i in range(n_contexts)]
    ctx_tokens = []
    for d in ctx_dom:
        own = WORDS[d]
        toks = [own[j] if rng.random() < 0.8 else vocab[rng.integers(len(vocab))]
                for j in rng.integers(0, len(own), L)]
        ctx_tokens.append(toks)
    ids = {w: i for i, w in enumerate(vocab)}
    token_ids = np.array([[ids[t] for t in row] for row in ctx_tokens], dtype=np.int32)

    with BuildWriter(path, meta={"build_hash": f"synthetic-{seed}"}) as w:
        w.insert("models", {"name": [MODEL], "hook": [HOOK], "d_model": np.array([64]),
                            "n_layers": np.array([2]), "info": [json.dumps({"synthetic": True})]})
        w.insert("contexts", {"id": np.arange(n_contexts), "domain": ctx_dom,
                              "split": ["eval" if i % 5 == 0 else "train" for i in range(n_contexts)],
                              "token_ids": token_ids, "tokens": ctx_tokens})
        experts = {}
        for s_i, (name, arch) in enumerate(saes):
            n = 1 if arch == "topk" else N
            active = 2 if arch == "scale" else 1
            experts[name] = _write_sae(w, rng, name, arch, M, n, active, ctx_tokens, ctx_dom,
                                       dom_of_word, (checkpoints or {}).get(name), s_i, top_k,
                                       bands, per_band, hist_bins, neighbours)
        names = list(experts)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                _write_matches(w, rng, a, b, experts[a], experts[b])
    return path


def _write_matches(w, rng, a, b, ea, eb):
    """Both directions: a nearest feature (mostly in the 'same' expert), a cosine, and a
    one-to-one partner (a permutation), like engine.analysis.compare writes them."""
    M = len(ea)
    perm = rng.permutation(M)
    for x, y, ex, ey, partner in ((a, b, ea, eb, perm), (b, a, eb, ea, np.argsort(perm))):
        nb = int(ey.max()) + 1
        same = (ex % nb) * (M // nb) + rng.integers(0, M // nb, M)
        nearest = np.where(rng.random(M) < 0.8, np.minimum(same, M - 1), rng.integers(0, M, M))
        cos = np.clip(rng.beta(5, 2, M), 0, 0.999).astype(np.float32)
        w.insert("feature_matches", {
            "sae": [x] * M, "other": [y] * M, "feature": np.arange(M), "nearest": nearest,
            "nearest_cos": cos, "partner": partner, "partner_cos": (cos * 0.9).astype(np.float32)})
        na = int(ex.max()) + 1
        count = np.zeros((na, nb))
        np.add.at(count, (ex, ey[nearest]), 1)
        share = count / np.maximum(count.sum(1, keepdims=True), 1)
        ii, jj = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
        w.insert("expert_matches", {"sae": [x] * share.size, "other": [y] * share.size,
                                    "i": ii.reshape(-1), "j": jj.reshape(-1),
                                    "share": share.reshape(-1), "mean_cos": np.full(share.size, 0.8)})


def _write_sae(w, rng, name, arch, M, N, active, ctx_tokens, ctx_dom, dom_of_word, checkpoint,
               s_i, top_k, bands, per_band, hist_bins, n_nb):
    n_ctx, L = len(ctx_tokens), len(ctx_tokens[0])
    per = M // N
    expert = np.minimum(np.arange(M) // per, N - 1)
    theme = [DOMAINS[e % len(DOMAINS)] for e in range(N)]
    words = [w for d in DOMAINS for w in WORDS[d]]

    # features
    density = np.where(rng.random(M) < 0.05, 0.0, 10 ** rng.uniform(-4, -1, M))
    n_tokens = n_ctx * L
    n_fires = np.round(density * n_tokens).astype(np.int64)
    max_act = np.where(n_fires > 0, rng.uniform(1, 10, M), 0.0)
    centres = rng.normal(0, 6, (N, 2))
    xy = centres[expert] + rng.normal(0, 1, (M, 2))
    # redundancy: Switch gets more near-duplicates than Scale
    dup_rate = 0.08 if arch == "switch" else 0.02
    max_cos = np.where(rng.random(M) < dup_rate, rng.uniform(0.9, 0.99, M), rng.beta(2, 5, M) * 0.9)
    top_tokens, pref, dcounts, logit_pos, logit_neg = [], [], [], [], []
    for f in range(M):
        d = theme[expert[f]]
        own = WORDS[d]
        picks = [own[j] for j in rng.choice(len(own), 3, replace=False)]
        top_tokens.append(" · ".join(picks) if n_fires[f] > 0 else "")
        pref.append(d if n_fires[f] > 0 else None)
        dcounts.append(json.dumps({d: int(n_fires[f] * 0.8), "other": int(n_fires[f] * 0.2)}))
        logit_pos.append([own[j] for j in rng.choice(len(own), 8)])
        logit_neg.append([words[j] for j in rng.choice(len(words), 8)])
    w.insert("features", {
        "sae": [name] * M, "feature": np.arange(M), "expert": expert, "n_fires": n_fires,
        "density": density, "mean_act": max_act / 3, "max_act": max_act,
        "x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32),
        "cluster": expert, "max_cos": max_cos.astype(np.float32), "top_tokens": top_tokens,
        "preferred_domain": pref, "domain_counts": dcounts,
        "hist": rng.integers(0, 50, (M, hist_bins)),
        "logit_pos": logit_pos, "logit_pos_val": np.sort(rng.random((M, 8)))[:, ::-1].astype(np.float32),
        "logit_neg": logit_neg, "logit_neg_val": -np.sort(rng.random((M, 8)))[:, ::-1].astype(np.float32),
    })
    nb = rng.integers(0, M, (M, n_nb))
    w.insert("neighbours", {
        "sae": [name] * (M * n_nb), "feature": np.repeat(np.arange(M), n_nb),
        "rank": np.tile(np.arange(n_nb), M), "other": nb.reshape(-1),
        "cos": np.sort(rng.random((M, n_nb)))[:, ::-1].reshape(-1).astype(np.float32),
    })
    lo = np.tile(np.arange(bands) / bands, M)
    w.insert("bands", {
        "sae": [name] * (M * bands), "feature": np.repeat(np.arange(M), bands),
        "band": np.tile(np.arange(bands), M), "lo": (lo * np.repeat(max_act, bands)).astype(np.float32),
        "hi": ((lo + 1 / bands) * np.repeat(max_act, bands)).astype(np.float32),
        "n": rng.integers(0, 100, M * bands), "share": np.full(M * bands, 1 / bands),
    })
    # examples: only for features that fire; chunked like analyze writes them
    firing = np.flatnonzero(n_fires > 0)
    kinds = ["top"] * top_k + ["band"] * (bands * per_band)
    band_col = np.r_[np.full(top_k, -1), np.repeat(np.arange(bands), per_band)]
    rank_col = np.r_[np.arange(top_k), np.tile(np.arange(per_band), bands)]
    per_f = len(kinds)
    for start in range(0, len(firing), 10_000):
        fs = firing[start:start + 10_000]
        n = len(fs) * per_f
        nnz = rng.integers(1, 6, n)
        pos = rng.integers(0, L, n)
        act_pos = rng.integers(0, L, nnz.sum())
        # the example's own position is the first entry, with its activation
        first = np.r_[0, np.cumsum(nnz)[:-1]]
        act_pos[first] = pos
        act_val = rng.uniform(0.1, 1.0, nnz.sum()) * np.repeat(np.repeat(max_act[fs], per_f), nnz)
        activation = act_val[first]
        w.insert("examples", {
            "sae": [name] * n, "feature": np.repeat(fs, per_f), "kind": kinds * len(fs),
            "band": np.tile(band_col, len(fs)), "rank": np.tile(rank_col, len(fs)),
            "context": rng.integers(0, n_ctx, n), "position": pos,
            "activation": activation.astype(np.float32),
            "act_pos": ragged_list_column(act_pos.astype(np.int16), nnz),
            "act_val": ragged_list_column(act_val.astype(np.float32), nnz),
        })
    if N > 1:
        # routing: each token to experts themed like its word's domain
        by_theme = {d: [e for e in range(N) if theme[e] == d] or [0] for d in DOMAINS}
        exps, wts = [], []
        for toks in ctx_tokens:
            row_e, row_w = [], []
            for t in toks:
                cands = by_theme[dom_of_word[t]]
                chosen = list(rng.choice(cands, min(active, len(cands)), replace=False))
                while len(chosen) < active:
                    chosen.append(int(rng.integers(N)))
                p = np.sort(rng.dirichlet(np.ones(active)))[::-1]
                row_e += [int(c) for c in chosen]
                row_w += [float(v) for v in p]
            exps.append(row_e)
            wts.append(row_w)
        w.insert("routing", {"sae": [name] * n_ctx, "context": np.arange(n_ctx),
                             "experts": [np.array(r, dtype=np.int16) for r in exps],
                             "weights": [np.array(r, dtype=np.float32) for r in wts]})
        top1 = np.array([r[0::active] for r in exps]).reshape(-1)
        load1 = np.bincount(top1, minlength=N) / top1.size
        allk = np.array(exps).reshape(-1)
        loadk = np.bincount(allk, minlength=N) / top1.size
        w.insert("experts", {
            "sae": [name] * N, "expert": np.arange(N), "n_features": np.full(N, per),
            "n_alive": np.bincount(expert[n_fires > 0], minlength=N), "load_top1": load1,
            "load_topk": loadk,
            "omega": rng.uniform(0.5, 1.5, N) if arch == "scale" else [None] * N,
            "mean_confidence": rng.uniform(0.3, 0.9, N),
            "router_entropy": rng.uniform(0.1, 0.9, N), "domain_entropy": rng.uniform(0, 1, N),
            "top_tokens": [json.dumps([{"token": t, "count": int(c), "share": float(c) / 100}
                                       for t, c in zip(WORDS[theme[e]][:6], range(60, 0, -10), strict=False)])
                           for e in range(N)],
        })
        rows = []
        for d in DOMAINS:
            ctx_rows = [i for i, cd in enumerate(ctx_dom) if cd == d]
            t1 = np.array([exps[i][0::active] for i in ctx_rows]).reshape(-1)
            c1 = np.bincount(t1, minlength=N)
            for e in range(N):
                rows.append((e, d, int(c1[e]), c1[e] / max(t1.size, 1)))
        w.insert("expert_domain_load", {
            "sae": [name] * len(rows), "expert": [r[0] for r in rows], "domain": [r[1] for r in rows],
            "n_tokens": [r[2] for r in rows], "load_top1": [r[3] for r in rows],
            "load_topk": [r[3] for r in rows]})
        sim = rng.uniform(0.1, 0.5, (N, N)) + np.eye(N) * 0.4
        w.insert("expert_similarity", {"sae": [name] * (N * N), "i": np.repeat(np.arange(N), N),
                                       "j": np.tile(np.arange(N), N), "value": sim.reshape(-1)})
        ent = float(-(load1[load1 > 0] * np.log(load1[load1 > 0])).sum() / np.log(N))
    else:
        ent = None
    # each context's strongest codes: features of the experts themed like its domain
    per_token = 8
    feats = rng.integers(0, M, (n_ctx, L, per_token)).astype(np.int32)
    acts = np.sort(rng.uniform(0.1, 5, (n_ctx, L, per_token)), axis=-1)[..., ::-1].astype(np.float32)
    feats[:, 0] = -1  # BOS is dropped
    acts[:, 0] = 0
    w.insert("context_codes", {"sae": [name] * n_ctx, "context": np.arange(n_ctx),
                               "per_token": np.full(n_ctx, per_token),
                               "features": feats.reshape(n_ctx, -1), "acts": acts.reshape(n_ctx, -1)})
    # duplicate pairs from the features whose max cosine is high
    hi = np.flatnonzero(max_cos > 0.7)
    partners = rng.integers(0, M, hi.size)
    w.insert("duplicate_pairs", {
        "sae": [name] * hi.size, "a": hi, "b": partners, "cos": max_cos[hi].astype(np.float32),
        "expert_a": expert[hi], "expert_b": expert[partners], "within": expert[hi] == expert[partners]})

    red = float((max_cos > 0.9).mean())
    base_mse = {"topk": 1.0, "switch": 1.2, "scale": 1.05}.get(arch, 1.1)
    metrics = {"mse": base_mse, "fvu": base_mse / 10, "l0": 16.0, "dead_fraction": float((n_fires == 0).mean()),
               "ce_loss_recovered": 0.8, "redundancy_ratio_0.9": red, "mean_max_cos": float(max_cos.mean())}
    log = [{"step": s, "tokens": s * 2048, "fvu": 1 / (1 + s / 10) + 0.05 * s_i, "mse": base_mse * (1 + 10 / (s + 1)),
            "l0": 16.0, "dead_fraction": 0.5 / (1 + s), "loss": 1 / (1 + s)} for s in range(0, 100, 10)]
    config = {"arch": arch, "width": M, "experts": N, "active": active, "k": 16}
    if checkpoint:
        config["checkpoint"] = str(checkpoint)
    w.insert("saes", {
        "sae": [name], "model": [MODEL], "hook": [HOOK], "arch": [arch], "width": np.array([M]),
        "experts": np.array([N]), "active": np.array([active]), "k": np.array([16]),
        "config": [json.dumps(config)], "metrics": [json.dumps(metrics)], "training_log": [json.dumps(log)],
        "n_tokens": np.array([n_ctx * L]), "n_contexts": np.array([n_ctx]),
        "hist_edges": np.logspace(-2, 1, hist_bins + 1)[None, :], "load_entropy": [ent],
        "map_method": ["umap"], "logit_note": ["Logit effects: W_dec · final norm · W_U."],
    })
    return expert
