"""METHOD.md §4 metrics against hand-computed cases and brute-force references.

evaluate() runs on an in-memory ActivationStore and a tiny fake language model that follow
docs/CONTRACTS.md, so these tests do not depend on harvesting or loading a real model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.errors import DataError
from engine.metrics.evaluate import EvalConfig, evaluate, evaluate_many, format_table
from engine.metrics.load import load_entropy
from engine.metrics.names import TAUS
from engine.sae import SAEConfig, build_sae
from tests.fakes import FakeActs, FakeLM

METRIC_KEYS = {
    "mse", "fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_recovered", "kl_div",
    "ce_loss_orig", "ce_loss_sae", "ce_loss_zero", "redundancy_ratio_0.7", "redundancy_ratio_0.8",
    "redundancy_ratio_0.9", "mean_max_cos", "redundancy_within_0.9", "redundancy_across_0.9",
    "expert_load_top1", "expert_load_topk", "expert_load_entropy", "expert_similarity", "omega",
    "n_tokens",
}  # fmt: skip


def perfect_sae(d: int, scale: float = 1.0, dead: int = 0):
    """W = [I; −I] (+ dead rows): ReLU(x) − ReLU(−x) = x, so x̂ = x exactly with k = 2d."""
    M = 2 * d + dead
    sae = build_sae(SAEConfig(arch="topk", d_in=d, width=M, k=M))
    with torch.no_grad():
        eye = torch.eye(d)
        W = torch.cat([eye, -eye, torch.ones(dead, d) / math.sqrt(d)])
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.b_enc[2 * d :] = -1e6  # never fire
        sae.input_scale.fill_(scale)
    return sae


def test_load_entropy():
    assert load_entropy([0.25] * 4) == pytest.approx(1.0)
    assert load_entropy([1.0, 0, 0, 0]) == pytest.approx(0.0)
    assert 0 < load_entropy([0.7, 0.1, 0.1, 0.1]) < 1
    assert load_entropy([1.0]) is None


# -- evaluate() end to end ---------------------------------------------------------------------
def test_perfect_reconstruction_has_zero_mse_and_fvu_and_counts_dead():
    d, dead = 6, 3
    x = np.random.default_rng(0).normal(size=(101, d)) * 5 + 2
    store = FakeActs.of(x)
    m = evaluate(perfect_sae(d, scale=0.3, dead=dead), store, None, EvalConfig(eval_batch=16))
    assert m["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert m["explained_variance"] == pytest.approx(1.0)
    assert m["l0"] == pytest.approx(d)  # exactly one of ReLU(x_i), ReLU(−x_i) is non-zero
    assert m["dead_fraction"] == pytest.approx(dead / (2 * d + dead))
    assert m["n_tokens"] == 101
    assert store.eval_set.chunk_sizes == [16] * 6 + [5]  # streamed, never read at once
    assert m["ce_loss_recovered"] is None and m["kl_div"] is None
    # +e_i: best partner is a dead row (1/√d); −e_i: only 0 or negative cosines; the dead rows
    # are identical (1).
    expected = (d / math.sqrt(d) + d * 0.0 + dead * 1.0) / (2 * d + dead)
    assert m["mean_max_cos"] == pytest.approx(expected, abs=1e-6)
    assert m["redundancy_ratio_0.9"] == pytest.approx(dead / (2 * d + dead))
    assert m["expert_load_top1"] == [1.0] and m["expert_load_entropy"] is None
    assert m["omega"] is None
    json.dumps(m, allow_nan=False)


def test_mse_in_raw_units_and_fvu_relation_match_brute_force():
    torch.manual_seed(0)
    d = 8
    sae = build_sae(SAEConfig(arch="topk", d_in=d, width=32, k=3))
    with torch.no_grad():
        sae.input_scale.fill_(0.1)  # raw activations are ~10× the normalised ones
        sae.b_dec.normal_()
    x = np.random.default_rng(1).normal(size=(203, d)).astype(np.float32) * 10 + 3
    m = evaluate(sae, FakeActs.of(x), None, EvalConfig(eval_batch=50))
    xt = torch.from_numpy(x)
    with torch.no_grad():
        err = (xt - sae.reconstruct_raw(xt)).double().pow(2).sum(-1)
        codes = sae.encode(sae.normalise(xt))
    var = (xt.double() - xt.double().mean(0)).pow(2).sum()
    assert m["mse"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert m["fvu"] == pytest.approx(float(err.sum() / var), rel=1e-5)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["mse"] > 1.0  # raw units, not the normalised ones
    assert m["l0"] == pytest.approx(float((codes.top_acts > 0).sum(-1).float().mean()))
    fired = torch.zeros(32, dtype=torch.bool)
    fired[codes.top_indices[codes.top_acts > 0]] = True
    assert m["dead_fraction"] == pytest.approx(1 - fired.float().mean().item())


def test_max_tokens_limits_the_stream():
    x = np.random.default_rng(0).normal(size=(100, 4))
    m = evaluate(perfect_sae(4), FakeActs.of(x), None, EvalConfig(eval_tokens=30, eval_batch=8))
    assert m["n_tokens"] == 30


def test_empty_eval_split_is_a_data_error():
    with pytest.raises(DataError, match="no evaluation tokens"):
        evaluate(perfect_sae(4), FakeActs.of(np.zeros((0, 4))))


@pytest.mark.parametrize("arch", ["switch", "scale"])
def test_moe_routing_metrics(arch):
    torch.manual_seed(0)
    N, d = 4, 8
    sae = build_sae(SAEConfig(arch=arch, d_in=d, width=32, experts=N, active=2, k=4))
    x = np.random.default_rng(0).normal(size=(300, d))
    m = evaluate(sae, FakeActs.of(x), None, EvalConfig(eval_batch=64))
    assert set(METRIC_KEYS) <= set(m)
    for tau in TAUS:
        for kind in ("ratio", "within", "across"):
            assert 0 <= m[f"redundancy_{kind}_{tau}"] <= 1
    assert len(m["expert_load_top1"]) == N and sum(m["expert_load_top1"]) == pytest.approx(1)
    assert len(m["expert_load_topk"]) == N and sum(m["expert_load_topk"]) == pytest.approx(1)
    assert 0 <= m["expert_load_entropy"] <= 1
    assert np.array(m["expert_similarity"]).shape == (N, N)
    assert m["omega"] == ([0.0] * N if arch == "scale" else None)
    # Reference loads from the router directly.
    with torch.no_grad():
        codes = sae.encode(sae.normalise(torch.tensor(x, dtype=torch.float32)))
    ref = torch.bincount(codes.expert_indices[:, 0], minlength=N).double() / len(x)
    assert m["expert_load_top1"] == pytest.approx(ref.tolist())
    json.dumps(m, allow_nan=False)


def ce_setup(sae, d: int, vocab: int = 11, n_ctx: int = 5, L: int = 7):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n_ctx, L)).astype(np.int32)
    split = ["train", "eval", "eval", "train", "eval"]
    model = FakeLM(vocab, d)
    x = model.E[torch.from_numpy(tokens[[1, 2, 4]]).long()][:, 1:].reshape(-1, d).numpy()
    return FakeActs.of(x, tokens, split), model, tokens, split


def test_ce_of_a_perfect_sae_is_fully_recovered():
    d = 5
    sae = perfect_sae(d)
    store, model, *_ = ce_setup(sae, d)
    m = evaluate(sae, store, model, EvalConfig(ce_batch=2))
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_orig"], abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_zero"] != pytest.approx(m["ce_loss_orig"])


def test_ce_and_kl_match_brute_force():
    torch.manual_seed(1)
    d, vocab = 5, 11
    sae = build_sae(SAEConfig(arch="topk", d_in=d, width=16, k=2))
    store, model, tokens, split = ce_setup(sae, d, vocab)
    m = evaluate(sae, store, model, EvalConfig(ce_contexts=2, ce_batch=1))
    t = torch.from_numpy(tokens[[1, 2]]).long()  # the first two eval contexts
    with torch.no_grad():
        act = model.E[t]
        spliced = act.clone()
        spliced[:, 1:] = sae.reconstruct_raw(act[:, 1:])
        zeroed = act.clone()
        zeroed[:, 1:] = 0
        prev = torch.cat([t[:, :1], t[:, :-1]], 1)
        lps = [
            torch.log_softmax(torch.tanh(a) @ model.U + model.P[prev], -1)[:, 1:-1]
            for a in (act, spliced, zeroed)
        ]
    tgt = t[:, 2:, None]
    ce = [float(-lp.gather(-1, tgt).mean()) for lp in lps]
    kl = float((lps[0].exp() * (lps[0] - lps[1])).sum(-1).mean())
    assert m["ce_loss_orig"] == pytest.approx(ce[0], rel=1e-5)
    assert m["ce_loss_sae"] == pytest.approx(ce[1], rel=1e-5)
    assert m["ce_loss_zero"] == pytest.approx(ce[2], rel=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx((ce[2] - ce[1]) / (ce[2] - ce[0]), rel=1e-4)
    assert m["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_several_saes_share_the_models_own_passes():
    """evaluate_many: each SAE's metrics are evaluate's, and per batch the model runs once
    unhooked, once zero-ablated and once per SAE (not three times per SAE)."""
    torch.manual_seed(2)
    d = 5
    saes = [build_sae(SAEConfig(arch=a, d_in=d, width=16, k=2, **kw))
            for a, kw in (("topk", {}), ("switch", {"experts": 4}), ("scale", {"experts": 4, "active": 2}))]
    store, model, *_ = ce_setup(saes[0], d)
    cfg = EvalConfig(ce_batch=2)  # 3 eval contexts: 2 batches
    alone = [evaluate(sae, store, model, cfg) for sae in saes]
    model.calls.clear()
    together = evaluate_many(saes, store, model, cfg)
    assert together == alone and list(together[0]) == list(alone[0])
    assert model.calls.count("orig") == 2 and model.calls.count("resume") == 2 * (1 + len(saes))


def test_no_lm_head_means_no_ce():
    d = 5
    sae = perfect_sae(d)
    store, model, *_ = ce_setup(sae, d)
    model.has_lm_head = False
    m = evaluate(sae, store, model)
    assert all(m[k] is None for k in ("ce_loss_recovered", "kl_div", "ce_loss_orig"))
    assert model.calls == []


def test_format_table_lists_scalar_metrics():
    x = np.random.default_rng(0).normal(size=(20, 4))
    m = evaluate(perfect_sae(4), FakeActs.of(x))
    table = format_table({"run-a": m, "run-b": m})
    assert "run-a" in table and "mse" in table and "redundancy_ratio_0.9" in table
    assert "expert_similarity" not in table
