"""engine.analysis: streaming statistics against brute force, and a full small build.

Fake ActivationStore / LoadedModel objects implement just the documented contract
(docs/CONTRACTS.md) so these tests do not depend on harvesting or loading a real model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.analysis.config import AnalysisConfig
from engine.analysis.map import map_coordinates
from engine.analysis.pipeline import analyze
from engine.analysis.stats import BandSampler, FeatureStats, band_of, merge_topk
from engine.sae import SAEConfig, build_sae
from engine.store import open_db
from tests.fakes import FakeActs, FakeLM


def tiny_sae(arch, d=16, width=32, experts=4, active=2, k=4, seed=0):
    torch.manual_seed(seed)
    return build_sae(SAEConfig(arch=arch, d_in=d, width=width, experts=experts, active=active, k=k))


# --------------------------------------------------------------------------------------------
# streaming statistics
# --------------------------------------------------------------------------------------------


def test_merge_topk_hand_case():
    buf_v = torch.full((2, 2), -math.inf)
    buf_i = torch.full((2, 2), -1, dtype=torch.long)
    merge_topk(buf_v, buf_i, torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 3.0, 2.0, 5.0]),
               torch.tensor([10, 11, 12, 13]))
    merge_topk(buf_v, buf_i, torch.tensor([0, 1, 1]), torch.tensor([2.5, 4.0, 6.0]),
               torch.tensor([20, 21, 22]))
    assert buf_v.tolist() == [[3.0, 2.5], [6.0, 5.0]]
    assert buf_i.tolist() == [[11, 20], [22, 13]]


def test_band_of_hand_case():
    b = band_of(torch.tensor([0.05, 0.1, 0.55, 0.99, 1.0]), torch.ones(5), 10)
    assert b.tolist() == [0, 1, 5, 9, 9]


def _random_codes(n=600, M=24, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(n)])
    vals = torch.rand(n, k, generator=g) * 20
    vals[torch.rand(n, k, generator=g) < 0.1] = 0.0  # TopK may select zeros
    return vals, idx


def test_feature_stats_match_brute_force():
    M, k, K, D = 24, 5, 7, 3
    vals, idx = _random_codes(M=M, k=k)
    n = len(vals)
    doms = torch.arange(n) % D
    st = FeatureStats(M, D, top_k=K, hist_bins=12, hist_range=(0.1, 10.0))
    for s in range(0, n, 97):  # odd chunk size
        st.update(vals[s : s + 97], idx[s : s + 97], torch.arange(s, min(n, s + 97)), doms[s : s + 97])
    z = torch.zeros(n, M).scatter_(1, idx, vals).numpy()  # dense brute force
    edges = st.edges.numpy()
    for f in range(M):
        col = z[:, f]
        fire = col > 0
        assert st.n_fires[f] == fire.sum()
        assert st.max[f] == pytest.approx(col.max())
        assert st.sum[f] == pytest.approx(col[fire].sum(), rel=1e-5)
        bins = np.clip(np.searchsorted(edges[1:-1], col[fire], side="right"), 0, 11)
        np.testing.assert_array_equal(st.hist_counts()[f].numpy(), np.bincount(bins, minlength=12))
        np.testing.assert_array_equal(st.domain_counts()[f].numpy(),
                                      np.bincount(doms.numpy()[fire], minlength=D))
        order = np.argsort(-col, kind="stable")[:K]
        np.testing.assert_allclose(st.top_val[f].numpy(), col[order], rtol=1e-6)
        np.testing.assert_array_equal(st.top_tok[f].numpy(), order)


def test_band_sampler_counts_and_samples_match_brute_force():
    M, k, bands, per = 24, 5, 4, 3
    vals, idx = _random_codes(M=M, k=k, seed=3)
    n = len(vals)
    z = torch.zeros(n, M).scatter_(1, idx, vals).numpy()
    mx = torch.from_numpy(z.max(0))
    bs = BandSampler(mx, bands, per, seed=0)
    for s in range(0, n, 50):
        bs.update(vals[s : s + 50], idx[s : s + 50], torch.arange(s, min(n, s + 50)))
    samples = bs.samples().numpy()
    for f in range(M):
        col = z[:, f]
        fire = np.nonzero(col > 0)[0]
        band = np.minimum(np.floor(col[fire] * bands / col.max()).astype(int), bands - 1)
        np.testing.assert_array_equal(bs.counts.view(M, bands)[f].numpy(), np.bincount(band, minlength=bands))
        for b in range(bands):
            members = set(fire[band == b].tolist())
            got = [t for t in samples[f, b] if t >= 0]
            assert len(got) == min(per, len(members)) and len(set(got)) == len(got)
            assert set(got) <= members


def test_band_sampler_is_roughly_uniform():
    # one feature, one band, 10 tokens, keep 1: each token should be picked ~10% of the time
    hits = np.zeros(10)
    for seed in range(400):
        bs = BandSampler(torch.tensor([1.0]), bands=1, per_band=1, seed=seed)
        for t in range(10):
            bs.update(torch.tensor([[0.5]]), torch.tensor([[0]]), torch.tensor([t]))
        hits[bs.samples()[0, 0, 0]] += 1
    assert hits.min() > 15 and hits.max() < 70


# --------------------------------------------------------------------------------------------
# decoder geometry
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the whole pass, through the store
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    acts = FakeActs.random()
    model = FakeLM(vocab=40, d=16, seed=1)
    runs = [("dense", tiny_sae("topk", k=4), {"model": "fake"}),
            ("switch", tiny_sae("switch", k=4, seed=1), {}),
            ("scale", tiny_sae("scale", k=4, seed=2), {})]
    db = tmp_path_factory.mktemp("an") / "build.duckdb"
    cfg = AnalysisConfig(analysis_contexts=8, top_examples=5, bands=4, per_band=2, umap=False,
                         chunk_tokens=13)
    analyze(runs, acts, model, db, cfg, metrics={"scale": {"fvu": 0.5}}, training_logs={"scale": [{"step": 1}]},
            build_hash="abc", progress=False)
    return db, acts, model, runs


def _dense_codes(acts, sae, n_contexts):
    ev = acts.eval_set
    chosen = np.unique(ev.context_ids)[:n_contexts]
    rows = np.nonzero(np.isin(ev.context_ids, chosen))[0]
    with torch.no_grad():
        codes = sae.encode(sae.normalise(torch.from_numpy(ev.read(rows))))
    return rows, sae.dense_codes(codes).numpy(), codes


@pytest.mark.parametrize("name", ["dense", "switch", "scale"])
def test_feature_pages_match_brute_force(built, name):
    db, acts, model, runs = built
    sae = next(s for n, s, _ in runs if n == name)
    rows, z, _ = _dense_codes(acts, sae, 8)
    ev = acts.eval_set
    with open_db(db) as s:
        assert s.build_hash() == "abc"
        info = s.sae_info(name)
        assert info.n_tokens == len(rows) and info.map_method == "pca"
        for f in range(sae.cfg.width):
            page = s.feature(name, f)
            col = z[:, f]
            assert page.n_fires == (col > 0).sum()
            assert page.max_act == pytest.approx(col.max(), rel=1e-5)
            assert page.density == pytest.approx((col > 0).mean())
            assert sum(page.hist_counts) == page.n_fires
            ex = s.feature_examples(name, f, "top", 10)
            want = np.sort(col[col > 0])[::-1][:5]
            np.testing.assert_allclose([e["activation"] for e in ex], want, rtol=1e-5)
            for e in ex:
                # the activation list covers the whole context and agrees at the example position
                assert len(e["acts"]) == len(e["tokens"]) == 8
                assert e["acts"][e["position"]] == pytest.approx(e["activation"], rel=1e-5)
                in_ctx = ev.context_ids[rows] == e["context"]
                brute = np.zeros(8)
                brute[ev.positions[rows][in_ctx]] = col[in_ctx]
                np.testing.assert_allclose(e["acts"], brute, rtol=1e-5, atol=1e-7)
            bands = s.quantile_bands(name, f)
            if page.n_fires:
                assert sum(b["n"] for b in bands) == page.n_fires
                assert sum(b["share"] for b in bands) == pytest.approx(1.0)
                for b in bands:
                    assert len(b["examples"]) == min(2, b["n"])
                    for e in b["examples"]:
                        assert b["lo"] - 1e-5 <= e["activation"] <= b["hi"] + 1e-5
            assert len(page.logit_pos) == 10 and len(page.neighbours) == 10
            want_logit = (sae.W_dec[f].detach() @ model.U).topk(10).values.numpy()
            np.testing.assert_allclose([v for _, v in page.logit_pos], want_logit, rtol=1e-4)


def test_routing_and_experts(built):
    db, acts, model, runs = built
    sae = next(s for n, s, _ in runs if n == "scale")
    rows, _, codes = _dense_codes(acts, sae, 8)
    ev = acts.eval_set
    with open_db(db) as s:
        experts = s.experts("scale")
        assert len(experts) == 4
        top1 = np.bincount(codes.expert_indices[:, 0].numpy(), minlength=4) / len(rows)
        np.testing.assert_allclose([e["load_top1"] for e in experts], top1)
        assert sum(e["load_topk"] for e in experts) == pytest.approx(1.0)
        p = codes.router_probs.double()
        h = (-(p * p.log()).sum(-1) / np.log(4)).numpy()
        first = codes.expert_indices[:, 0].numpy()
        for i, e in enumerate(experts):
            if (first == i).any():
                assert e["router_entropy"] == pytest.approx(h[first == i].mean(), rel=1e-5)
        assert s.sae_info("scale").load_entropy is not None
        assert s.sae_info("scale").metrics == {"fvu": 0.5} and s.training_log("scale") == [{"step": 1}]
        loads = s.expert_domain_load("scale")
        assert {r["domain"] for r in loads} == {"pydoc", "bible"}
        assert s.expert_similarity("scale").shape == (4, 4)
        # per-token routing of a context equals the encoder's, and the dropped position has none
        c = int(ev.context_ids[rows][0])
        rt = s.context_routing("scale", c)
        for r_i, t in enumerate(rows):
            if ev.context_ids[t] == c:
                got = rt[ev.positions[t]]
                assert got["experts"] == codes.expert_indices[r_i].tolist()
                np.testing.assert_allclose(got["weights"], codes.expert_weights[r_i].numpy(), rtol=1e-5)
        assert s.context_routing("scale", 3)[0]["experts"] == []  # dropped (3, 0)
        assert s.context_routing("dense", c)[1]["experts"] == []
        assert len(s.map_points("switch")["x"]) == 32
        pairs = s.duplicate_pairs("scale", -1.0, limit=1000)
        # down to dup_threshold 0.7, and the min_pairs (500) most similar whatever their cosine:
        # all 32·31/2 pairs of this small SAE
        assert len(pairs) == 32 * 31 // 2
        assert all(p["within"] == (p["expert_a"] == p["expert_b"]) for p in pairs)
        assert [p["cos"] for p in pairs] == sorted((p["cos"] for p in pairs), reverse=True)
    assert experts[0]["omega"] == pytest.approx(0.0)


def test_search_finds_quote_token(built):
    db, *_ = built
    with open_db(db) as s:
        pts = s.map_points("scale")
        want = {int(f) for f, t in zip(pts["feature"], pts["top_tokens"], strict=True) if "it's" in t}
        hits = s.search_features("scale", "IT'S", limit=100)
        assert want and want <= {h["feature"] for h in hits}


@pytest.mark.slow  # numba compiles UMAP on first use (~15-40 s)
def test_umap_map_has_fixed_seed(tmp_path):
    pytest.importorskip("umap")

    W = torch.randn(60, 8)
    a, method = map_coordinates(W, True, seed=0, n_epochs=30)
    b, _ = map_coordinates(W, True, seed=0, n_epochs=30)
    assert method == "umap" and a.shape == (60, 2)
    np.testing.assert_allclose(a, b)
    assert map_coordinates(W[:10], True)[1] == "pca"


def test_feature_matches_and_expert_correspondence(built):
    db, _acts, _model, runs = built
    W = {n: s.W_dec.detach() for n, s, _ in runs}
    experts = {n: s.feature_expert().numpy() for n, s, _ in runs}
    with open_db(db) as s:
        assert s.comparisons("scale") == ["dense", "switch"]
        for a, b in [("scale", "switch"), ("switch", "scale"), ("dense", "scale")]:
            A = W[a] / W[a].norm(dim=1, keepdim=True)
            B = W[b] / W[b].norm(dim=1, keepdim=True)
            cos = (A @ B.T).numpy()
            rows = s.feature_matches(a, b, order="feature", limit=1000)
            firing = {r["feature"] for r in rows}
            assert firing == {f for f in range(32) if s.feature(a, f).n_fires > 0}
            for r in rows:  # nearest = brute-force argmax
                f = r["feature"]
                assert r["nearest"] == cos[f].argmax()
                assert r["nearest_cos"] == pytest.approx(cos[f].max(), abs=1e-5)
                if r["partner"] >= 0:
                    assert r["partner_cos"] == pytest.approx(cos[f, r["partner"]], abs=1e-5)
                    assert r["partner_cos"] <= r["nearest_cos"] + 1e-6
                else:  # none of its candidates was left free
                    assert r["partner_cos"] is None or np.isnan(r["partner_cos"])
            # the matching is one-to-one, and its inverse is the other direction's partner
            all_rows = [s.match_of(a, b, f) for f in range(32)]
            partners = [r["partner"] for r in all_rows if r["partner"] >= 0]
            assert len(set(partners)) == len(partners) > 16
            for r in all_rows:
                if r["partner"] >= 0:
                    assert s.match_of(b, a, r["partner"])["partner"] == r["feature"]
            shared = s.feature_matches(a, b, order="shared", limit=5)
            assert [r["nearest_cos"] for r in shared] == sorted((r["nearest_cos"] for r in rows),
                                                                 reverse=True)[:5]
            # expert correspondence: share of expert i's features whose nearest lies in expert j
            share, _mean = s.expert_matches(a, b)
            n_a, n_b = experts[a].max() + 1, experts[b].max() + 1
            want = np.zeros((n_a, n_b))
            for f in range(32):
                want[experts[a][f], experts[b][cos[f].argmax()]] += 1
            want /= np.bincount(experts[a], minlength=n_a)[:, None]
            np.testing.assert_allclose(share, want)


def test_greedy_matching_hand_case():
    from engine.analysis.compare import match_features

    # a0 is closest to b0 (0.9) but a1 is closer still (0.95); greedy gives b0 to a1 and b1 to a0
    W_a = torch.tensor([[1.0, 0.0], [0.95, 0.3122]])
    W_b = torch.tensor([[0.9, 0.4359], [0.0, 1.0]])
    m = match_features(W_a, W_b, candidates=2)
    assert m.nearest_ab.tolist() == [0, 0]
    assert m.partner_ab.tolist() == [1, 0] and m.partner_ba.tolist() == [1, 0]


def test_text_search_and_context_codes(built):
    db, acts, _model, runs = built
    sae = next(s for n, s, _ in runs if n == "switch")
    rows, z, _ = _dense_codes(acts, sae, 8)
    ev = acts.eval_set
    with open_db(db) as s:
        c = int(ev.context_ids[rows][0])
        ctx = s.context(c)
        assert ctx["split"] == "eval"
        needle = (ctx["tokens"][2] + ctx["tokens"][3]).upper()
        hits = s.search_contexts(needle, limit=100)
        mine = next(h for h in hits if h["context"] == c)
        assert 3 in mine["hits"]
        text = "".join(ctx["tokens"]).lower()
        assert all(needle.lower() in "".join(h["tokens"]).lower() for h in hits)
        assert mine["hits"] == sorted(set(mine["hits"])) and text.count(needle.lower()) >= 1
        assert s.search_contexts("   ") == []
        codes = s.context_codes("switch", c)
        assert len(codes) == 8
        for t in np.nonzero(ev.context_ids[rows] == c)[0]:
            pos = ev.positions[rows][t]
            col = z[t]
            want = np.argsort(-col, kind="stable")[: min(4, int((col > 0).sum()))]
            got = codes[pos]
            assert [f for f, _ in got] == want.tolist()
            np.testing.assert_allclose([v for _, v in got], col[want], rtol=1e-5)
        assert codes[0] == [] if c == 3 else True
        assert s.context_codes("switch", 10_000) == []
