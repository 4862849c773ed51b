"""The SAE forward passes against METHOD.md, hand-computed cases and a dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.sae import SAEConfig, build_sae, moe, registry
from engine.sae.base import EncoderOutput
from engine.sae.initialisation import geometric_median
from engine.sae.moe import route_topk
from engine.training.schedule import lr_for_width


def make(arch, **kw):
    torch.manual_seed(0)
    cfg = dict(arch=arch, d_in=8, width=32, experts=4, active=2, k=6)
    cfg.update(kw)
    sae = build_sae(SAEConfig(**cfg))
    with torch.no_grad():  # non-trivial biases so that every term of the equations matters
        for name, p in sae.named_parameters():
            if name.startswith("b_"):
                p.normal_(0, 0.3)
    return sae


# -- hand-computed cases ------------------------------------------------------------------------
def test_routing_weights_are_softmax_of_selected_probabilities():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    idx, w = route_topk(probs, 2, "softmax")
    assert idx.tolist() == [[1, 2]]
    a, b = math.exp(0.5), math.exp(0.3)
    assert torch.allclose(w, torch.tensor([[a / (a + b), b / (a + b)]]))
    # not the softmax of the logits: weights stay near 1/e
    assert abs(float(w[0, 0]) - 0.5) < 0.06
    _, w01 = route_topk(probs, 2, "binary")
    assert w01.tolist() == [[1.0, 1.0]]


def test_feature_scaling_identity_at_init_and_hand_case():
    sae = make("scale")
    W = sae.W_enc.view(4, 8, 8)
    assert torch.allclose(sae.scaled_encoder(), W, atol=1e-6)  # ω = 0, T = I → plain encoder
    g = torch.Generator().manual_seed(1)
    T = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g)  # T ≠ I
    with torch.no_grad():
        sae.omega.copy_(torch.tensor([1.0, 0.0, -0.5, 2.0]))
        sae.T.copy_(T)
    omega = sae.omega.detach()[:, None, None]
    mean = W.mean(1, keepdim=True)
    # METHOD §3: H_i = W_i − T·mean, so Ŵ_i = (1 + ω_i) W_i − ω_i · T·mean_j W_i[j,:]
    want = (1 + omega) * W - omega * (mean @ T.T)
    assert torch.allclose(sae.scaled_encoder(), want, atol=1e-5)
    # a checkpoint of the plain-mean form (saved before 2026-11-25) keeps H_i = W_i − mean
    sae.cfg.scaling_form = "plain_mean"
    old = mean @ T.T + (1 + omega) * (W - mean)
    assert torch.allclose(sae.scaled_encoder(), old, atol=1e-5)


def test_load_balance_is_one_when_balanced_and_N_when_collapsed():
    sae = make("switch", active=1)
    N = 4
    probs = torch.full((8, N), 1.0 / N)
    top = torch.arange(8) % N
    codes = EncoderOutput(
        torch.zeros(8, 1), torch.zeros(8, 1, dtype=torch.long), top[:, None], None, probs, None, None
    )
    assert float(sae.load_balance_loss(codes)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, N)
    collapsed[:, 0] = 1.0
    codes = codes._replace(router_probs=collapsed, expert_indices=torch.zeros(8, 1, dtype=torch.long))
    assert float(sae.load_balance_loss(codes)) == pytest.approx(N)


def test_global_topk_spans_experts_by_hand():
    """Two experts of two features each, k = 2: the two largest weighted values win, even
    when both come from the second-ranked expert."""
    sae = build_sae(SAEConfig(arch="scale", d_in=2, width=4, experts=2, active=2, k=2,
                              feature_scaling=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.tensor([[1.0, 0], [0.5, 0], [0, 3.0], [0, 2.0]]))
        sae.W_g.copy_(torch.tensor([[1.0, 0], [0, 0]]))  # expert 0 is preferred for x = (1, 1)
    x = torch.tensor([[1.0, 1.0]])
    codes = sae.encode(x)
    g = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    w = torch.softmax(g, 0)  # softmax of the selected probabilities
    assert codes.expert_indices.tolist() == [[0, 1]]
    assert torch.allclose(codes.expert_weights[0], w)
    got = dict(zip(codes.top_indices[0].tolist(), codes.top_acts[0].tolist(), strict=True))
    assert set(got) == {2, 3}  # both from expert 1: 3·w1 and 2·w1 beat 1·w0 since w1 > 1/3
    assert got[2] == pytest.approx(3 * float(w[1]))
    assert got[3] == pytest.approx(2 * float(w[1]))


# -- the grouped (MoE) computation equals a dense reference written from METHOD.md ------------
def reference_encode(sae, x):
    """METHOD.md §1–3 computed densely over all experts and then masked (the slow way)."""
    cfg = sae.cfg
    N, m, e, k = cfg.experts, cfg.expert_width, cfg.active, cfg.k
    if cfg.arch == "topk":
        z = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
        v, i = z.topk(k)
        return torch.zeros_like(z).scatter(1, i, v)
    if cfg.arch == "switch":
        p = torch.softmax((x - sae.b_router) @ sae.W_r.T, -1)
        i_star = p.argmax(-1)
        pre = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).view(-1, N, m)
        mask = F.one_hot(i_star, N).float()
        f = (pre * mask[:, :, None] * p.gather(1, i_star[:, None])[:, :, None]).reshape(-1, N * m)
        v, i = f.topk(k)
        return torch.zeros_like(f).scatter(1, i, v)
    g = torch.softmax((x - sae.b_gate) @ sae.W_g.T + sae.b_g, -1)
    top_p, S = g.topk(e)
    w_sel = torch.softmax(top_p, -1) if cfg.expert_weighting == "softmax" else torch.ones_like(top_p)
    w = torch.zeros_like(g).scatter(1, S, w_sel)
    W_hat = sae.scaled_encoder().reshape(N * m, -1)
    z = F.relu((x - sae.b_dec) @ W_hat.T + sae.b_enc).view(-1, N, m)
    f = (z * w[:, :, None]).reshape(-1, N * m)
    v, i = f.topk(k)
    return torch.zeros_like(f).scatter(1, i, v)


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("topk", {}),
        ("switch", {}),
        ("scale", {}),
        ("scale", {"active": 1}),
        ("scale", {"active": 4}),
        ("scale", {"feature_scaling": False}),
        ("scale", {"expert_weighting": "binary"}),
    ],
)
def test_encode_matches_dense_reference(arch, kw):
    sae = make(arch, **kw)
    if arch == "scale" and sae.cfg.feature_scaling:
        with torch.no_grad():
            sae.omega.normal_(0, 0.5)
            sae.T.add_(0.1 * torch.randn_like(sae.T))
    x = torch.randn(64, 8) * 2
    codes = sae.encode(x)
    got = sae.dense_codes(codes)
    want = reference_encode(sae, x)
    assert torch.allclose(got, want, atol=1e-5)
    # decode is W_decᵀ z + b_dec
    assert torch.allclose(sae.decode(codes.top_acts, codes.top_indices), want @ sae.W_dec + sae.b_dec,
                          atol=1e-5)


def test_moe_encoder_computes_only_selected_experts(monkeypatch):
    """The encoder matmuls see B·e token rows in total, never B·N (either expert encode)."""
    rows = []
    real_linear = F.linear

    def counting_linear(inp, weight, bias=None):
        rows.append((inp.shape[0], weight.shape[0]))
        return real_linear(inp, weight, bias)

    real_mm = torch.mm

    def counting_mm(inp, weight_t, **kw):  # the CPU's fused path (moe._expert_picks_cpu)
        rows.append((inp.shape[0], weight_t.shape[1]))
        return real_mm(inp, weight_t, **kw)

    monkeypatch.setattr(moe.F, "linear", counting_linear)
    monkeypatch.setattr(moe.torch, "mm", counting_mm)
    for arch, e in (("switch", 1), ("scale", 2)):
        rows.clear()
        sae = make(arch, active=e)
        sae.encode(torch.randn(50, 8))
        assert sum(r for r, _ in rows) == 50 * e
        assert all(out == sae.cfg.expert_width for _, out in rows)


# -- training-recipe pieces ----------------------------------------------------------------------
def test_decoder_gradient_parallel_component_removed_and_rows_unit():
    sae = make("scale")
    out = sae(torch.randn(32, 8))
    out.mse.backward()
    sae.remove_gradient_parallel_to_decoder()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(32), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.set_decoder_norm_to_unit()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


def test_switch_router_gets_reconstruction_gradient():
    sae = make("switch")
    sae(torch.randn(32, 8)).mse.backward()
    assert sae.W_r.grad is not None and sae.W_r.grad.abs().sum() > 0


def test_scale_feature_scaling_parameters_learn():
    """ω learns from the start; T through ω (Ŵ_i = (1 + ω_i) W_i − ω_i·T·mean), so at ω = 0
    its gradient is exactly zero and it starts learning once ω moves (as in the authors' code)."""
    sae = make("scale")
    with torch.no_grad():
        sae.omega.zero_()
    sae(torch.randn(32, 8)).mse.backward()
    assert sae.omega.grad.abs().sum() > 0 and sae.T.grad.abs().sum() == 0
    sae.zero_grad()
    with torch.no_grad():
        sae.omega.fill_(0.1)
    sae(torch.randn(32, 8)).mse.backward()
    assert sae.T.grad.abs().sum() > 0


def test_auxk_loss_uses_dead_features_only():
    sae = make("topk")
    x = torch.randn(16, 8)
    assert float(sae(x).auxk_loss) == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    out = sae(x, dead_mask=dead, auxk_k=4)
    assert float(out.auxk_loss.detach()) > 0
    out.auxk_loss.backward()
    assert sae.W_dec.grad[10:].abs().sum() == 0  # only dead rows are used by AuxK


def test_geometric_median_resists_outliers():
    x = torch.zeros(101, 3)
    x[:50] = torch.tensor([1.0, 0, 0])
    x[50:] = torch.tensor([0.0, 0, 0])
    x[100] = torch.tensor([1e6, 0, 0])
    assert float(geometric_median(x)[0]) < 2.0  # the mean would be ~1e4


def test_lr_rule():
    assert lr_for_width(2**14) == pytest.approx(2e-4)
    assert lr_for_width(2**16) == pytest.approx(1e-4)


def test_reconstruct_raw_undoes_normalisation():
    sae = make("topk")
    sae.input_scale.fill_(0.5)
    x = torch.randn(3, 5, 8)
    out = sae.reconstruct_raw(x)
    flat = sae(x.reshape(-1, 8) * 0.5).x_hat / 0.5
    assert torch.allclose(out.reshape(-1, 8), flat, atol=1e-6)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"width": 30, "experts": 4}, "divisible"),
        ({"active": 5, "experts": 4}, "cannot exceed"),
        ({"k": 17, "active": 2}, "exceeds the 16 features"),
        ({"arch": "dense"}, "Unknown architecture"),
        ({"expert_weighting": "uniform"}, "Unknown expert weighting"),
    ],
)
def test_bad_configs_are_one_sentence(kw, msg):
    cfg = dict(arch="scale", d_in=8, width=32, experts=4, active=2, k=6)
    cfg.update(kw)
    with pytest.raises(ConfigError, match=msg):
        build_sae(SAEConfig(**cfg))


def test_registry_knows_what_each_architecture_can_do():
    assert registry.trainable() == ["topk", "switch", "scale"]
    assert not registry.get("jumprelu").trainable and not registry.get("standard").topk_codes
    assert registry.get("switch").max_active == 1 and registry.get("scale").routed
    with pytest.raises(ConfigError, match="Unknown architecture 'dense'; choose one of topk, switch, scale"):
        registry.get("dense")


def test_normalised_config_keeps_what_was_asked():
    asked = SAEConfig(arch="topk", d_in=8, width=32, experts=16, active=2, k=4)
    assert (asked.experts, asked.active) == (16, 2)  # a training config names the run as asked
    built = build_sae(asked).cfg
    assert (built.experts, built.active) == (1, 1)
    assert build_sae(SAEConfig(arch="switch", d_in=8, width=32, experts=4, active=3, k=4)).cfg.active == 1
