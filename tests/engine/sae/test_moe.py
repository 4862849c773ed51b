"""The fast kernels against the plain reference they replace (engine/sae/moe.py): the grouped
GEMM against the per-expert loop, and the sparse backward against ordinary autograd — same
codes, same gradient for every parameter — for every architecture, with and without AuxK."""

from __future__ import annotations

import pytest
import torch

from engine.sae import SAEConfig, build_sae
from engine.sae.moe import (
    decode_picks,
    decode_picks_sddmm,
    expert_counts,
    grouped_expert_encode,
    grouped_expert_encode_gmm,
    router_logits,
    router_logits_fused,
    topk_chunked,
    topk_encode,
    topk_encode_sparse,
)

CASES = [
    ("topk", {}),
    ("switch", {}),
    ("scale", {}),
    ("scale", {"active": 1}),
    ("scale", {"active": 3}),
    ("scale", {"feature_scaling": False}),
    ("scale", {"scaling_form": "plain_mean"}),
    ("scale", {"expert_weighting": "binary"}),
]


def make(arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(arch=arch, d_in=12, width=64, experts=4, active=2, k=6)
    cfg.update(kw)
    sae = build_sae(SAEConfig(**cfg))
    with torch.no_grad():  # every parameter away from its initial value, so each term matters
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "omega":
                p.normal_(0, 0.3)
            elif name == "T":
                p.add_(0.1 * torch.randn_like(p))
    return sae


@pytest.mark.parametrize("form", ["t_mean", "plain_mean"])
def test_fused_feature_scaling_equals_the_plain_expression(form, monkeypatch):
    """Ŵ and the gradients of W_enc, T and ω from the fused form against autograd through METHOD
    §3 written out (in float64, with T ≠ I and ω ≠ 0), and a finite-difference check; where
    Triton's interpreter runs, the fused form through the Triton kernels too (`group_affine`,
    `group_sums`)."""
    from engine.sae import kernels as triton_kernels
    from engine.sae.scale import _FeatureScaling

    sae = make("scale", scaling_form=form).double()
    go = torch.randn(4, 16, 12, dtype=torch.float64)
    out = {}
    forms = ["reference", "fast"] + (["fast, triton"] if triton_kernels.interpreted() else [])
    for kernels in forms:
        sae.kernels = kernels.split(",")[0]
        monkeypatch.setattr(triton_kernels, "ENABLED", {"cpu": kernels == "fast, triton"})
        W_hat = sae.scaled_encoder()
        out[kernels] = (W_hat, *torch.autograd.grad(W_hat, (sae.W_enc, sae.T, sae.omega), go))
    for kernels in forms[1:]:
        for a, b in zip(out["reference"], out[kernels], strict=True):
            assert torch.allclose(a, b, atol=1e-12), kernels
    monkeypatch.setattr(triton_kernels, "ENABLED", {"cpu": False})  # gradcheck's many calls
    W = sae.W_enc.detach().view(4, 16, 12).clone().requires_grad_()
    T, omega = sae.T.detach().clone().requires_grad_(), sae.omega.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda W, T, o: _FeatureScaling.apply(W, T, o, form == "t_mean"),
                                    (W, T, omega))


@pytest.mark.parametrize("form", ["t_mean", "plain_mean"])
def test_fused_feature_scaling_through_the_cpu_kernels(form, monkeypatch, numba_kernels):
    """In float32 on the CPU the fused form's backward takes its two reductions from numba's
    `group_sums`: Ŵ and the gradients of W_enc, T and ω as the plain expression's, to float32
    rounding."""
    cpu_kernels = numba_kernels
    calls = []
    real = cpu_kernels.group_sums
    monkeypatch.setattr(cpu_kernels, "group_sums", lambda *a: calls.append(1) or real(*a))
    sae = make("scale", scaling_form=form)
    with torch.no_grad():
        sae.omega.uniform_(-0.5, 0.5)
        sae.T.add_(0.1 * torch.randn_like(sae.T))
    go = torch.randn(4, 16, 12)
    out = {}
    for kernels in ("reference", "fast"):
        sae.kernels = kernels
        W_hat = sae.scaled_encoder()
        out[kernels] = (W_hat, *torch.autograd.grad(W_hat, (sae.W_enc, sae.T, sae.omega), go))
    assert calls == [1]  # the fast form's backward only
    for a, b in zip(out["reference"], out["fast"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_expert_counts_on_the_device_equal_bincount():
    idx = torch.randint(0, 7, (300,))
    assert expert_counts(idx, 9).tolist() == torch.bincount(idx, minlength=9).tolist()


@pytest.mark.parametrize("align", [1, 16])
def test_grouped_gemm_equals_the_loop(align):
    g = torch.Generator().manual_seed(0)
    N, m, d, B = 5, 8, 12, 40  # rows of 16-byte multiples, as the grouped GEMM needs
    x = torch.randn(B, d, generator=g, requires_grad=True)
    W = torch.randn(N, m, d, generator=g, requires_grad=True)
    b = torch.randn(N, m, generator=g, requires_grad=True)
    tokens = torch.arange(B).repeat_interleave(2)
    experts = torch.randint(0, N - 1, (2 * B,), generator=g)  # expert N−1 gets no token
    a = grouped_expert_encode(x, tokens, experts, W, b)
    c = grouped_expert_encode_gmm(x, tokens, experts, W, b, align=align)
    assert torch.allclose(a, c, atol=1e-5)
    go = torch.randn_like(a)
    ga = torch.autograd.grad(a, (x, W, b), go)
    gc = torch.autograd.grad(c, (x, W, b), go)
    for p, q in zip(ga, gc, strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def _params_and_grads(sae, kernels, x, dead, encode_gmm=False, monkeypatch=None):
    sae.kernels = kernels
    sae.zero_grad(set_to_none=True)
    out = sae(x, dead_mask=dead, auxk_k=5)
    loss = out.mse + 0.3 * out.lb_loss + 0.7 * out.auxk_loss
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else None for n, p in sae.named_parameters()}
    return out, grads


def _batch(with_dead: bool):
    """48 tokens of d 12, and a dead mask over a third of the 64 features where asked."""
    dead = None
    if with_dead:
        dead = torch.zeros(64, dtype=torch.bool)
        dead[::3] = True
    return torch.randn(48, 12) * 2, dead


def _assert_same_codes_and_grads(sae, ref, g_ref, fast, g_fast):
    """The same firing picks, values equal up to rounding, the same AuxK loss and gradients."""
    fired = {kernels: sae.dense_codes(out.codes) for kernels, out in (("ref", ref), ("fast", fast))}
    assert torch.equal(fired["ref"] > 0, fired["fast"] > 0)
    assert torch.allclose(fired["ref"], fired["fast"], atol=1e-6)
    assert torch.allclose(ref.auxk_loss, fast.auxk_loss, atol=1e-6)
    for name, g in g_ref.items():
        assert (g is None) == (g_fast[name] is None), name
        if g is not None:
            assert torch.allclose(g, g_fast[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("chunks", [False, True], ids=["one topk", "two-stage topk"])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("arch,kw", CASES)
def test_sparse_backward_equals_the_reference(arch, kw, with_dead, chunks, monkeypatch):
    from engine.sae import moe

    monkeypatch.setattr(moe, "TOPK_SLICE", {"cpu": 8} if chunks else {})
    sae = make(arch, **kw)
    x, dead = _batch(with_dead)
    ref, g_ref = _params_and_grads(sae, "reference", x, dead)
    fast, g_fast = _params_and_grads(sae, "fast", x, dead)
    # the same firing picks; values equal up to rounding (the fast Feature Scaling is a fused
    # form). Where a token has fewer than k positive candidates the rest of its picks are zeros
    # either way, but not the same ones: the reference picks among ReLU's zeros, the fast path
    # takes the largest negative pre-activations (its ReLU runs after the TopK)
    _assert_same_codes_and_grads(sae, ref, g_ref, fast, g_fast)
    if with_dead:
        assert float(fast.auxk_loss.detach()) > 0


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("form", ["t_mean", "plain_mean"])
def test_feature_scaling_folded_into_the_encode(form, with_dead, monkeypatch, numba_kernels):
    """On the CPU in float32 the fast path never writes Ŵ out: Ŵ_i x = s_i · (W_i x) + ⟨c_i, x⟩
    per candidate (`moe.folds_scaling`). The same codes and gradients of every parameter as the
    reference and as the fast path with Ŵ formed first (`_FeatureScaling`), and the input's
    gradient too."""
    from engine.sae import moe, scale

    sae = make("scale", scaling_form=form)
    x, dead = _batch(with_dead)
    ref, g_ref = _params_and_grads(sae, "reference", x, dead)
    formed = []
    real = scale._FeatureScaling.apply
    monkeypatch.setattr(scale._FeatureScaling, "apply", lambda *a: formed.append(1) or real(*a))
    fold, g_fold = _params_and_grads(sae, "fast", x, dead)
    assert formed == []  # Ŵ never formed
    _assert_same_codes_and_grads(sae, ref, g_ref, fold, g_fold)
    monkeypatch.setattr(scale, "folds_scaling", lambda *a: False)
    unfolded, g_unfolded = _params_and_grads(sae, "fast", x, dead)
    assert formed == [1]
    _assert_same_codes_and_grads(sae, unfolded, g_unfolded, fold, g_fold)
    grads_x = []
    for folds in (moe.folds_scaling, lambda *a: False):
        monkeypatch.setattr(scale, "folds_scaling", folds)
        x_in = x.clone().requires_grad_()
        codes = sae.encode(x_in, dead, 5)
        loss = codes.top_acts.square().sum() + (codes.aux_acts.sum() if with_dead else 0)
        grads_x.append(torch.autograd.grad(loss, x_in)[0])
    assert torch.allclose(*grads_x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("triton", [False, True], ids=["pytorch", "triton"])
@pytest.mark.parametrize("encode", ["loop", "grouped gemm"])
@pytest.mark.parametrize("mode", ["epilogue", "sums"])
def test_feature_scaling_folded_as_on_cuda(mode, encode, triton, with_dead, monkeypatch, request):
    """Feature Scaling folded into the encode as CUDA runs it. "epilogue"
    (`moe.scaled_expert_encode`): each pair's ⟨c_i, x⟩ from one [B, d] × [d, N] product,
    s_i · (W_i x) + ⟨c_i, x⟩ + b_i after the loop's products or in the grouped GEMM's epilogue
    (the Triton `expert_rows`, here through the interpreter, or PyTorch's ops), the picks' W_i x
    read where the encode wrote them, the backward's per-pick and per-expert sums in PyTorch.
    "sums": Ŵ written once by the encode (`moe.scaled_weights`), W's gradient and s_i's from one
    segmented sum (`moe.scaled_scatter_rows`: the Triton `scaled_segment_sum`, or PyTorch's
    ops). On the CPU with numba off: the reference's codes and the gradient of every parameter,
    `_FeatureScaling` never run."""
    from engine.sae import base, cpu_kernels, moe, scale

    monkeypatch.setattr(moe, "CUDA_SCALING", mode)
    if triton:
        kernels = request.getfixturevalue("triton_interpreter")
        monkeypatch.setattr(kernels, "ENABLED", {"cpu": True})
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    for module in (moe, scale):
        monkeypatch.setattr(module, "folds_scaling", lambda *a: True)
    if encode == "grouped gemm":
        monkeypatch.setattr(base, "expert_encoder", lambda *a: moe.grouped_expert_encode_gmm)
    sae = make("scale")
    x, dead = _batch(with_dead)
    ref, g_ref = _params_and_grads(sae, "reference", x, dead)
    formed, epilogues, sums = [], [], []
    real = scale._FeatureScaling.apply
    monkeypatch.setattr(scale._FeatureScaling, "apply", lambda *a: formed.append(1) or real(*a))
    real_encode = moe.scaled_expert_encode
    monkeypatch.setattr(moe, "scaled_expert_encode",
                        lambda *a: epilogues.append(a[-1].__name__) or real_encode(*a))
    real_sums = moe.scaled_scatter_rows
    monkeypatch.setattr(moe, "scaled_scatter_rows", lambda *a: sums.append(1) or real_sums(*a))
    fold, g_fold = _params_and_grads(sae, "fast", x, dead)
    assert formed == []  # no autograd through Ŵ
    want = "grouped_expert_encode_gmm" if encode == "grouped gemm" else "grouped_expert_encode"
    assert (epilogues, sums) == (([want], []) if mode == "epilogue" else ([], [1]))
    _assert_same_codes_and_grads(sae, ref, g_ref, fold, g_fold)
    grads_x = []  # and the input's gradient, folded and with Ŵ formed
    for folds in (True, False):
        for module in (moe, scale):
            monkeypatch.setattr(module, "folds_scaling", lambda *a, folds=folds: folds)
        x_in = x.clone().requires_grad_()
        codes = sae.encode(x_in, dead, 5)
        loss = codes.top_acts.square().sum() + (codes.aux_acts.sum() if with_dead else 0)
        grads_x.append(torch.autograd.grad(loss, x_in)[0])
    assert torch.allclose(*grads_x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["epilogue", "sums"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_fold_in_bf16_is_as_exact_as_forming_the_weights(device, mode, monkeypatch, request):
    """Under bf16 autocast as a GPU trains (the grouped GEMM; Feature Scaling folded into its
    Triton epilogue, or Ŵ written once in bf16 with the backward folded into the segmented sum,
    `moe.CUDA_SCALING`): the loss and every gradient as close to float32's as with Ŵ formed
    first — on the CPU through Triton's interpreter with CUDA's choices made by hand. On CUDA
    in float32 also the reference's codes and gradients."""
    from engine.sae import base, cpu_kernels, moe, scale

    monkeypatch.setattr(moe, "CUDA_SCALING", mode)
    dev = torch.device(device)
    if device == "cpu":
        kernels = request.getfixturevalue("triton_interpreter")
        monkeypatch.setattr(kernels, "ENABLED", {"cpu": True})
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
        monkeypatch.setattr(base, "expert_encoder", lambda *a: moe.grouped_expert_encode_gmm)
    else:
        sae = make("scale").to(dev)
        x, dead = _batch(True)
        ref, g_ref = _params_and_grads(sae, "reference", x.to(dev), dead.to(dev))
        fast, g_fast = _params_and_grads(sae, "fast", x.to(dev), dead.to(dev))
        _assert_same_codes_and_grads(sae, ref, g_ref, fast, g_fast)
    sae = make("scale", d_in=64, width=512, experts=8).to(dev)
    sae.kernels = "fast"
    x = 2 * torch.randn(256, 64, generator=torch.Generator().manual_seed(1)).to(dev)

    counted = "scaled_expert_encode" if mode == "epilogue" else "scaled_scatter_rows"
    calls, real = [], getattr(moe, counted)
    monkeypatch.setattr(moe, counted, lambda *a: calls.append(1) or real(*a))

    def run(fold: bool, bf16: bool):
        for module in (moe, scale):
            monkeypatch.setattr(module, "folds_scaling", lambda *a: fold)
        sae.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x)
        (out.mse + 0.3 * out.lb_loss).backward()
        return {"loss": out.mse.detach().float(),
                **{n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}}

    exact = run(False, False)
    errors = {}
    for fold in (True, False):
        calls.clear()
        got = run(fold, True)
        assert set(got) == set(exact) and len(calls) == fold
        errors[fold] = {n: float((got[n] - v).norm() / v.norm().clamp_min(1e-12))
                        for n, v in exact.items()}
    for name, err in errors[True].items():
        assert err <= 1.5 * errors[False][name] + 2e-2, (name, err, errors[False][name])


def test_the_encoder_gradient_sums_the_rows_the_products_read(triton_interpreter, monkeypatch):
    """Under bf16 autocast with the Triton kernels (here through the interpreter), W's
    gradient sums the rows of x − centre in bf16, as the products read them, accumulated in
    float32 (`ENCODER_ROWS_IN_COMPUTE_DTYPE`), and the centre's is one product with the bf16
    weights the products read (`CENTRE_GRAD_FROM_PRODUCTS`): the same picks, W's and the
    centre's gradients within bf16's rounding of the float32 forms; b's the same."""
    from engine.sae import cpu_kernels, moe

    monkeypatch.setattr(triton_interpreter, "ENABLED", {"cpu": True})
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    g = torch.Generator().manual_seed(4)
    N, m, d, B, e = 4, 8, 12, 30, 2
    x = torch.randn(B, d, generator=g)
    centre, W, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((d,), (N, m, d), (N, m)))
    experts = torch.stack([torch.randperm(N, generator=g)[:e] for _ in range(B)])
    weights = torch.softmax(torch.randn(B, e, generator=g), -1)
    out = []
    for rows_in_bf16 in (True, False):
        monkeypatch.setattr(moe, "ENCODER_ROWS_IN_COMPUTE_DTYPE", rows_in_bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            codes = topk_encode_sparse(x, centre, W, b, 5, experts, weights)
        loss = (codes.top_acts.float() * (codes.top_indices % 7 + 1)).sum()
        out.append((codes.top_indices, torch.autograd.grad(loss, (W, centre, b))))
    (idx_a, (gW_a, *rest_a)), (idx_b, (gW_b, *rest_b)) = out
    assert torch.equal(idx_a, idx_b)
    assert not torch.equal(gW_a, gW_b)
    assert float((gW_a - gW_b).norm() / gW_b.norm()) < 2**-8  # bf16's rounding of each row
    (g_centre_a, g_b_a), (g_centre_b, g_b_b) = rest_a, rest_b
    assert not torch.equal(g_centre_a, g_centre_b)
    assert float((g_centre_a - g_centre_b).norm() / g_centre_b.norm()) < 2**-7
    assert torch.equal(g_b_a, g_b_b)


@pytest.mark.parametrize("arch", ["scale", "topk"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_centred_rows_written_once_in_bf16_change_no_bit(arch, device, monkeypatch, request):
    """Under bf16 autocast with the Triton kernels, x − b_gate and x − b_dec are written once
    in bf16 (`kernels.centred_rows`, `moe.ROUND_CENTRED_ROWS`) where PyTorch wrote them in
    float32 and cast them: compiled, the same codes and loss bit for bit and the same gradients
    up to float32's order of summation (CUDA's `index_add_` sums b_enc's with atomics, in any
    order: on an H100 those two differed in the last bits run to run); on the CPU through
    Triton's interpreter (CUDA's choices made by hand), which rounds to bf16 by truncation, the
    same loss within that rounding."""
    from engine.sae import base, cpu_kernels, kernels, moe, scale

    if device == "cpu":
        kernels = request.getfixturevalue("triton_interpreter")
        monkeypatch.setattr(kernels, "ENABLED", {"cpu": True})
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
        monkeypatch.setattr(base, "expert_encoder", lambda *a: moe.grouped_expert_encode_gmm)
        for module in (moe, scale):
            monkeypatch.setattr(module, "folds_scaling", lambda *a: moe.CUDA_SCALING != "formed")
    calls, real = [], kernels.centred_rows
    monkeypatch.setattr(kernels, "centred_rows", lambda *a: calls.append(1) or real(*a))
    sae = make(arch, d_in=64, width=512, experts=8).to(device)  # rows of 16-byte multiples
    sae.kernels = "fast"
    x = 2 * torch.randn(64, sae.cfg.d_in, generator=torch.Generator().manual_seed(8)).to(device)
    assert kernels.use_fused(x), kernels._FUSED_WORKS  # the passes under test run here
    got = []
    for rounded in (True, False):
        monkeypatch.setattr(moe, "ROUND_CENTRED_ROWS", rounded)
        sae.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = sae(x)
        (out.mse + 0.3 * out.lb_loss).backward()
        got.append({"loss": out.mse.detach(), "codes": out.codes.top_indices.sort(1).values,
                    **{n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}})
    assert len(calls) == (2 if arch == "scale" else 1)  # the router's and the encoder's
    assert got[0].keys() == got[1].keys()
    if device == "cpu":
        assert torch.allclose(got[0]["loss"], got[1]["loss"], rtol=2**-7)
        return
    assert torch.equal(got[0].pop("loss"), got[1].pop("loss"))
    assert torch.equal(got[0].pop("codes"), got[1].pop("codes"))
    for name, value in got[0].items():
        assert torch.allclose(value, got[1][name], rtol=1e-5, atol=1e-7), name


def test_b_decs_gradient_takes_the_column_sums_the_loss_made(monkeypatch, numba_kernels):
    """On the CPU the squared error's backward sums its gradient's rows as it writes them, and
    the decode hands those to b_dec (`moe.column_sums`) instead of a pass of its own: the
    reference's gradient; a gradient without them (autograd's sum where two add into x̂) falls
    back to summing."""
    from engine.sae import moe

    carried = []
    real = moe.column_sums
    monkeypatch.setattr(moe, "column_sums",
                        lambda g: carried.append(hasattr(g, "_column_sums")) or real(g))
    sae = make("scale")
    x, dead = _batch(False)
    ref, g_ref = _params_and_grads(sae, "reference", x, dead)
    fast, g_fast = _params_and_grads(sae, "fast", x, dead)
    assert carried == [True]
    _assert_same_codes_and_grads(sae, ref, g_ref, fast, g_fast)
    g = torch.randn(5, 3)
    assert torch.equal(real(g), g.sum(0))
    assert torch.equal(real(moe.with_column_sums(g.clone(), torch.ones(3))), torch.ones(3))


def test_the_cpu_encode_groups_pairs_by_expert_as_the_loop_does(numba_kernels):
    """The CPU's fused encode sorts the (token, expert) pairs by a counting sort: with an expert
    no token chose and one every token chose, the same codes and gradients as the plain
    reference (`topk_encode`, `_expert_groups`' argsort)."""
    g = torch.Generator().manual_seed(5)
    N, m, d, B, e, k = 5, 8, 12, 40, 2, 6
    x = torch.randn(B, d, generator=g)
    W, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((N, m, d), (N, m)))
    experts = torch.stack([torch.tensor([0, 1 + int(torch.randint(0, 3, (1,), generator=g))])
                           for _ in range(B)])  # expert 0 always, expert 4 never
    weights = torch.softmax(torch.randn(B, e, generator=g), -1)
    out = []
    for encode in (topk_encode, topk_encode_sparse):
        codes = encode(x, None, W, b, k, experts, weights)
        loss = (codes.top_acts * (codes.top_indices % 7 + 1)).sum()
        dense = torch.zeros(B, N * m).scatter_(1, codes.top_indices, codes.top_acts)
        out.append((dense, torch.autograd.grad(loss, (W, b))))
    (a, ga), (c, gc) = out
    assert torch.equal(a > 0, c > 0) and torch.allclose(a, c, atol=1e-5)
    for p, q in zip(ga, gc, strict=True):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)


def test_scaling_where_it_cannot_fold_is_formed_first(monkeypatch, numba_kernels):
    """`topk_encode_sparse` with `scaling` where `folds_scaling` says no (here the numba kernels
    off) forms Ŵ with autograd first: the same codes and gradients as the fold."""
    cpu_kernels = numba_kernels
    g = torch.Generator().manual_seed(3)
    N, m, d, B, e = 4, 8, 12, 30, 2
    x = torch.randn(B, d, generator=g)
    centre, W, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((d,), (N, m, d), (N, m)))
    scale = (torch.rand(N, generator=g) + 0.5).requires_grad_()
    shift = (0.3 * torch.randn(N, d, generator=g)).requires_grad_()
    experts = torch.stack([torch.randperm(N, generator=g)[:e] for _ in range(B)])
    weights = torch.softmax(torch.randn(B, e, generator=g), -1)
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
        codes = topk_encode_sparse(x, centre, W, b, 5, experts, weights, scaling=(scale, shift))
        loss = (codes.top_acts * (codes.top_indices % 7 + 1)).sum()  # any order of the picks
        out.append((codes, torch.autograd.grad(loss, (centre, W, b, scale, shift))))
    (a, ga), (c, gc) = out
    dense = [torch.zeros(B, N * m).scatter_(1, t.top_indices, t.top_acts) for t in (a, c)]
    assert torch.allclose(*dense, atol=1e-5)
    for p, q in zip(ga, gc, strict=True):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="mean_grad"):  # its share of W's gradient needs the fold
        topk_encode_sparse(x, centre, W, b, 5, experts, weights, scaling=(scale, shift),
                           mean_grad=lambda g: g)


@pytest.mark.parametrize("arch", ["topk", "scale"])
def test_tokens_with_fewer_positive_candidates_than_k(arch):
    """The fast path's ReLU runs on its picks, after the TopK: where a token has fewer than k
    positive candidates, it fills the rest with zeros from other candidates than the
    reference's, and nothing else differs — codes, losses and every gradient."""
    sae = make(arch)
    with torch.no_grad():
        sae.b_enc.fill_(-1.5)  # most pre-activations negative
    x = torch.randn(48, 12)
    ref, g_ref = _params_and_grads(sae, "reference", x, None)
    fast, g_fast = _params_and_grads(sae, "fast", x, None)
    n_fired = (ref.codes.top_acts > 0).sum(1)
    assert bool((n_fired < 6).any()) and bool((n_fired > 0).any())
    assert torch.equal(sae.dense_codes(ref.codes) > 0, sae.dense_codes(fast.codes) > 0)
    assert torch.allclose(sae.dense_codes(ref.codes), sae.dense_codes(fast.codes), atol=1e-6)
    assert torch.allclose(ref.mse, fast.mse, atol=1e-6)
    for name, g in g_ref.items():
        assert torch.allclose(g, g_fast[name], atol=1e-5, rtol=1e-4), name


def test_sparse_backward_with_the_grouped_gemm_equals_the_reference():
    sae = make("scale")
    x = torch.randn(40, 12, requires_grad=True)
    W, b = sae.scaled_encoder(), sae.b_enc.view(4, 16)
    g = torch.softmax(x @ sae.W_g.T, -1)
    top_p, S = g.topk(2)
    w = torch.softmax(top_p, -1)
    ref = topk_encode(x, sae.b_dec, W, b, 6, S, w)
    fast = topk_encode_sparse(x, sae.b_dec, W, b, 6, S, w,
                              encode=lambda *a: grouped_expert_encode_gmm(*a, align=16))
    assert torch.equal(ref.top_indices.sort(1).values, fast.top_indices.sort(1).values)
    go = torch.randn_like(ref.top_acts)
    # gradients are compared per selected feature, so order the picks alike
    r_ord, f_ord = ref.top_indices.argsort(1), fast.top_indices.argsort(1)
    # every input, the centre b_dec (its own gradient in the fast path) and x itself included
    inputs = (sae.W_enc, sae.T, sae.omega, w, sae.b_dec, x)
    gr = torch.autograd.grad(ref.top_acts.gather(1, r_ord), inputs, go, retain_graph=True)
    gf = torch.autograd.grad(fast.top_acts.gather(1, f_ord), inputs, go)
    for p, q in zip(gr, gf, strict=True):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param(
    "cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("values", ["distinct", "ties", "with -inf"])
@pytest.mark.parametrize("chunks", [2, 8, 16])
def test_the_two_stage_topk_is_the_topk(values, chunks, device, dtype):
    g = torch.Generator().manual_seed(chunks)
    f = torch.randn(40, 128, generator=g)
    if values == "ties":  # few distinct values: many ties at the k-th
        f = torch.randint(0, 6, (40, 128), generator=g).float()
    elif values == "with -inf":  # AuxK's masked candidates, some slices all -inf
        f[:, : 128 // chunks * (chunks // 2)] = float("-inf")
    if values == "distinct" and dtype == torch.bfloat16:  # distinct in bf16 too
        f = torch.stack([torch.randperm(128, generator=g) for _ in range(40)]).float()  # exact
    f = f.to(device, dtype)
    k = 8
    top, pos = topk_chunked(f, k, chunks)
    ref, _ = f.topk(k, dim=-1)
    assert torch.equal(top.sort(-1, descending=True).values, ref)
    assert torch.equal(f.gather(1, pos), top)  # each value is at its position
    assert all(len(set(row.tolist())) == k for row in pos)  # k distinct positions
    if values == "distinct":
        assert torch.equal(pos.sort(-1).values, f.topk(k, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("lead", [(10,), (2, 5)])
def test_the_fused_router_logits_equal_the_plain_ones(lead):
    g = torch.Generator().manual_seed(0)
    x, c, W = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((*lead, 6), (6,), (4, 6)))
    go = torch.randn(*lead, 4, generator=g, dtype=torch.float64)
    a, b = router_logits(x, c, W), router_logits_fused(x, c, W)
    assert torch.allclose(a, b, atol=1e-12)
    for p, q in zip(torch.autograd.grad(a, (x, c, W), go), torch.autograd.grad(b, (x, c, W), go),
                    strict=True):
        assert torch.allclose(p, q, atol=1e-12)


def test_the_fused_routers_weight_gradient_is_autocasts_under_bf16():
    """Under bf16 autocast W's gradient is a bf16 product, as autocast's own backward: within
    bf16 rounding of the reference, and exactly a bf16 result widened."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    c = torch.randn(32, generator=g, requires_grad=True)
    W = torch.randn(8, 32, generator=g, requires_grad=True)
    go = torch.randn(64, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = router_logits(x, c, W), router_logits_fused(x, c, W)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    (ga,) = torch.autograd.grad(a, (W,), go)
    (gb,) = torch.autograd.grad(b, (W,), go)
    assert gb.dtype == torch.float32 and torch.equal(gb, gb.bfloat16().float())
    assert torch.allclose(ga, gb, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("case", ["distinct", "repeated"])
def test_the_sddmm_decode_equals_the_bag(case, device):
    """x̂ and the gradients of the values and of W: the sparse backward against embedding_bag's
    own, on picks in no order, and with a feature picked twice by one token (on the GPU too,
    where benchmarks/profile_gpu.py compares their speed)."""
    g = torch.Generator().manual_seed(0)
    B, k, M, d = 9, 5, 40, 12
    idx = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(B)])
    if case == "repeated":
        idx[3, 4] = idx[3, 1]
    acts = torch.rand(B, k, generator=g, dtype=torch.float64)
    W = torch.randn(M, d, generator=g, dtype=torch.float64)
    go = torch.randn(B, d, generator=g, dtype=torch.float64)
    idx, go = idx.to(device), go.to(device)
    acts, W = acts.to(device).requires_grad_(), W.to(device).requires_grad_()
    out = {}
    for decode in (decode_picks, decode_picks_sddmm):
        y = decode(acts, idx, W)
        out[decode] = (y, *torch.autograd.grad(y, (acts, W), go))
    for a, c in zip(out[decode_picks], out[decode_picks_sddmm], strict=True):
        assert torch.allclose(a, c, atol=1e-12)
    # by hand: ∂acts[b, j] = ⟨g[b], W[idx[b, j]]⟩
    assert torch.allclose(out[decode_picks_sddmm][1], (W[idx] * go[:, None, :]).sum(-1), atol=1e-12)


def test_without_the_values_kernel_the_decode_is_the_bags(monkeypatch):
    from engine.sae import moe

    cpu = torch.device("cpu")
    assert moe.picks_decoder(cpu, torch.float32) is decode_picks_sddmm
    monkeypatch.setattr(moe, "_BAG_WEIGHTS_GRAD", None)
    assert moe.picks_decoder(cpu, torch.float32) is decode_picks


@pytest.mark.parametrize("arch", ["topk", "switch", "scale"])
def test_the_fast_kernels_take_other_dtypes_as_the_reference_does(arch):
    """float16 input to float32 weights gives codes in the promoted dtype of x − b_dec, as the
    reference; bf16 weights on the CPU train (the sparse decode is kept to float32/64 there:
    the bag then)."""
    x = torch.randn(16, 12)
    sae = make(arch)
    dtypes = set()
    for kernels in ("reference", "fast"):
        sae.kernels = kernels
        dtypes.add(sae(x.half()).codes.top_acts.dtype)
    assert dtypes == {torch.float32}
    sae = make(arch).to(torch.bfloat16)
    out = sae(x.bfloat16(), dead_mask=torch.ones(64, dtype=torch.bool), auxk_k=5)
    (out.mse + out.lb_loss + out.auxk_loss).backward()
    assert sae.W_dec.grad.dtype == torch.bfloat16 and bool(sae.W_dec.grad.abs().sum() > 0)


def test_auxk_is_zero_without_dead_features():
    sae = make("topk")
    x = torch.randn(16, 12)
    none_dead = torch.zeros(64, dtype=torch.bool)
    out = sae(x, dead_mask=none_dead, auxk_k=5)
    assert float(out.auxk_loss.detach()) == 0.0
    out.auxk_loss.backward()  # a zero loss with a graph behind it


def test_auxk_asks_only_for_dead_features_a_token_can_choose_among():
    """Hand case: 4 experts of 16 features with 3, 0, 5 and 1 dead. A dense SAE's token sees
    all 9; a Switch token one expert (at most 5); a Scale e=2 token two (at most 5 + 3)."""
    dead = torch.zeros(64, dtype=torch.bool)
    for expert, n in enumerate([3, 0, 5, 1]):
        dead[expert * 16 : expert * 16 + n] = True
    assert make("topk").dead_candidates_bound(dead) == 9
    assert make("switch").dead_candidates_bound(dead) == 5
    assert make("scale").dead_candidates_bound(dead) == 8
    assert make("scale").dead_candidates_bound(torch.zeros(64, dtype=torch.bool)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunks", [False, True], ids=["one topk", "two-stage topk"])
@pytest.mark.parametrize("arch", ["topk", "switch", "scale"])
def test_a_training_step_never_waits_for_the_gpu(arch, chunks, monkeypatch):
    from engine.sae import moe
    from engine.training.schedule import make_adam, optimiser_step

    monkeypatch.setattr(moe, "TOPK_SLICE", {"cuda": 64} if chunks else {})

    sae = make(arch, width=4096, experts=16, d_in=256).cuda()
    opt = make_adam(sae.parameters(), 1e-4)
    x = torch.randn(2048, 256, device="cuda")
    dead = torch.zeros(4096, dtype=torch.bool, device="cuda")
    for _ in range(2):  # warm up allocations and lazy initialisation
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sae(x, dead_mask=dead).mse.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x, dead_mask=dead)
        (out.mse + out.lb_loss + out.auxk_loss).backward()
        optimiser_step(sae, opt, 1.0)  # the projection, the clip folded into Adam, renormalisation
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_grouped_gemm_in_bf16_is_as_exact_as_the_loop(device):
    """In bf16 (on CUDA the grouped GEMM's fast path, on Hopper and Blackwell) the grouped GEMM's
    output (the pre-activations: the ReLU is applied after it) and gradients are as close to
    the float32 result on the same inputs as the bf16 loop's are."""
    from engine.sae.moe import expert_encoder

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    N, m, d, B = 16, 64, 256, 1000
    x = torch.randn(B, d, device=dev, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(N, m, d, device=dev, generator=g) / 16).bfloat16().requires_grad_()
    b = (torch.randn(N, m, device=dev, generator=g) / 4).bfloat16().requires_grad_()
    tokens = torch.arange(B, device=dev).repeat_interleave(2)
    experts = torch.randint(0, N - 1, (2 * B,), device=dev, generator=g)  # expert N−1 empty
    exact = grouped_expert_encode(x.float(), tokens, experts, W.float(), b.float())
    loop = grouped_expert_encode(x, tokens, experts, W, b)
    fast = grouped_expert_encode_gmm(x, tokens, experts, W, b)
    if device == "cuda":
        encode = expert_encoder(dev, torch.bfloat16)
        print("expert encode on this GPU:", encode.__name__, torch.cuda.get_device_capability(dev))
    assert fast.dtype == torch.bfloat16

    def err(a, ref):
        return float((a.detach().float() - ref.detach()).norm() / ref.detach().norm())

    assert err(fast, exact) <= 1.5 * err(loop, exact) + 1e-3
    go = torch.randn(exact.shape, device=dev, generator=g)
    g_exact = torch.autograd.grad(exact, (x, W, b), go)
    g_loop = torch.autograd.grad(loop, (x, W, b), go.bfloat16())
    g_fast = torch.autograd.grad(fast, (x, W, b), go.bfloat16())
    for name, e, lo, fa in zip("xWb", g_exact, g_loop, g_fast, strict=True):
        assert err(fa, e) <= 1.5 * err(lo, e) + 1e-3, (name, err(fa, e), err(lo, e))


def test_the_grouped_gemms_epilogue_in_triton_is_the_composed_one(triton_interpreter, monkeypatch):
    """Without autograd (the sparse TopK's forward) the grouped GEMM's epilogue is one Triton
    pass (`kernels.expert_rows`, here through the interpreter): the same numbers; with
    autograd the composed form, which autograd can differentiate."""
    kernels = triton_interpreter
    g = torch.Generator().manual_seed(0)
    N, m, d, B = 5, 8, 12, 40
    x, W, b = torch.randn(B, d, generator=g), torch.randn(N, m, d, generator=g), torch.randn(N, m, generator=g)
    tokens = torch.arange(B).repeat_interleave(2)
    experts = torch.randint(0, N - 1, (2 * B,), generator=g)
    with torch.no_grad():
        plain = grouped_expert_encode_gmm(x, tokens, experts, W, b)
    calls = []
    monkeypatch.setattr(kernels, "ENABLED", {"cpu": True})
    real = kernels.expert_rows
    monkeypatch.setattr(kernels, "expert_rows", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = grouped_expert_encode_gmm(x, tokens, experts, W, b)
    assert calls == [1] and torch.equal(fused, plain)
    W.requires_grad_()
    assert grouped_expert_encode_gmm(x, tokens, experts, W, b).requires_grad and calls == [1]


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("arch,kw", CASES[:3])
def test_the_two_weight_gradients_share_one_sort_of_the_picks(arch, kw, with_dead, monkeypatch):
    """With PyTorch's sort (as on a GPU; the CPU's numba kernels group picks their own way),
    the decoder's and the encoder's weight gradients sort the TopK picks once between them
    (`FeatureGroups`), and every gradient still equals the reference's. With AuxK the
    encoder's picks are more than the decoder's: each sorts its own."""
    from engine.sae import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    sae = make(arch, **kw)
    x, dead = _batch(with_dead)
    ref, g_ref = _params_and_grads(sae, "reference", x, dead)
    sorted_sizes, real = [], torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda t, *a, **kw: sorted_sizes.append(t.numel()) or real(t, *a, **kw))
    fast, g_fast = _params_and_grads(sae, "fast", x, dead)
    monkeypatch.setattr(torch, "argsort", real)
    k = sae.cfg.k
    picks = [n for n in sorted_sizes if n > 48 * 3]  # not the routing's (≤ 3 experts a token)
    if with_dead:
        k_aux = fast.codes.aux_indices.shape[1]
        assert sorted(picks) == sorted([48 * k, 48 * k_aux, 48 * (k + k_aux)])
    else:
        assert picks == [48 * k]
    _assert_same_codes_and_grads(sae, ref, g_ref, fast, g_fast)


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("arch,kw", CASES[:3] + [("scale", {"active": 3})])
def test_the_step_through_the_triton_kernels_equals_the_reference(arch, kw, with_dead, monkeypatch,
                                                                  triton_interpreter):
    """The whole fast forward and backward with every Triton kernel the GPU runs (row TopK,
    segmented sums with the decode's bias, both decoder gradients from one pass, Feature
    Scaling's affine and sums, the squared error and its gradient), here through Triton's
    interpreter: the reference's codes and every gradient."""
    from engine.sae import cpu_kernels

    triton_kernels = triton_interpreter
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    sae = make(arch, **kw)
    x, dead = _batch(with_dead)
    ref, g_ref = _params_and_grads(sae, "reference", x, dead)
    monkeypatch.setattr(triton_kernels, "ENABLED", {"cpu": True})
    calls = {name: [] for name in ("row_topk", "squared_error", "scaled_diff", "decoder_grads")}
    for name, seen in calls.items():
        real = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name,
                            lambda *a, _real=real, _seen=seen, **kw: _seen.append(1) or _real(*a, **kw))
    fast, g_fast = _params_and_grads(sae, "fast", x, dead)
    assert len(calls["row_topk"]) == (2 if with_dead else 1)
    assert calls["squared_error"] and len(calls["scaled_diff"]) == 1  # (AuxK scales by one more)
    assert calls["decoder_grads"]  # (and AuxK's decode)
    _assert_same_codes_and_grads(sae, ref, g_ref, fast, g_fast)
