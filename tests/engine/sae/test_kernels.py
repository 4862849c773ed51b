"""The Triton kernels of engine/sae/kernels.py against the `embedding_bag` forms they replace
(and, for the optimiser's passes, the CPU's numba kernels with the same signatures beside them):
compiled on CUDA, through Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine.sae import cpu_kernels, kernels  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
    not kernels.interpreted(), reason="CPU tensors need Triton's interpreter (set on machines without CUDA)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _csr(lengths, rows, gen):
    """Segments of the given lengths over `rows` rows: (ix, w, offsets)."""
    n = sum(lengths)
    ix = torch.randint(0, rows, (n,), generator=gen)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return ix, w, offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_segment_sum_is_the_bag(device, dtype):
    """Empty segments, one longer than a program's block of rows (several passes of its loop),
    d not a multiple of the block of columns; float32 accumulation for half inputs."""
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 0, 1, 2 * kernels.BLOCKS["segment_p"] + 5, 0, 7, 0]
    X = torch.randn(40, 70, generator=gen, dtype=torch.float64)
    ix, w, offsets = _csr(lengths, 40, gen)
    ref = F.embedding_bag(ix, X, offsets[:-1], mode="sum", per_sample_weights=w)
    Xd, wd = X.to(device, dtype), w.to(device, dtype)
    got = kernels.segment_sum(Xd, ix.to(device), wd, offsets.to(device), out_dtype=torch.float64)
    exact = F.embedding_bag(ix, Xd.double().cpu(), offsets[:-1], mode="sum",
                            per_sample_weights=wd.double().cpu())  # the rounded inputs, exactly
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(got.cpu(), exact, atol=tol, rtol=tol)
    if dtype == torch.float64:
        assert torch.allclose(got.cpu(), ref, atol=1e-12)
    assert bool((got[1] == 0).all()) and bool((got[-1] == 0).all())  # empty segments
    bias = torch.randn(70, generator=gen, dtype=torch.float64).to(device, dtype)
    started = kernels.segment_sum(Xd, ix.to(device), wd, offsets.to(device),
                                  out_dtype=torch.float64, bias=bias)  # each row from the bias
    assert torch.allclose(started.cpu(), exact + bias.double().cpu(), atol=tol, rtol=tol)
    assert torch.equal(started[1].cpu(), bias.double().cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_segment_sum_scales_shifts_and_dots_each_group(device, dtype):
    """`scaled_segment_sum` against the float64 bag: rows in groups, each group's sums scaled
    and shifted (empty segments give the shift alone), each row's dot product with W of the
    unscaled sum — a segment longer than a block of picks, d over several column blocks and not
    a multiple of one, rows of X in bf16 as the encoder's gradient reads them; bad shapes
    refused in one sentence."""
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 0, 2 * kernels.BLOCKS["segment_p"] + 5, 1, 0, 4]  # 3 groups of 2 rows
    d = 2 * kernels.BLOCKS["segment_d"] + 7
    X = torch.randn(30, d, generator=gen)
    ix, w, offsets = _csr(lengths, 30, gen)
    w = w.float()
    scale, init = torch.tensor([0.5, -2.0, 1.25]), torch.randn(3, d, generator=gen)
    W = torch.randn(len(lengths), d, generator=gen)
    Xd = X.to(dtype)
    got, dots = kernels.scaled_segment_sum(Xd.to(device), ix.to(device), w.to(device),
                                           offsets.to(device), scale.to(device),
                                           init.to(device), W.to(device))
    S = F.embedding_bag(ix, Xd.double(), offsets[:-1], mode="sum", per_sample_weights=w.double())
    want = S * scale.double().repeat_interleave(2)[:, None] + init.double().repeat_interleave(2, 0)
    assert got.dtype == dots.dtype == torch.float32 and dots.shape == (len(lengths),)
    assert torch.allclose(got.cpu().double(), want, atol=1e-4, rtol=1e-5)
    assert torch.allclose(dots.cpu().double(), (S * W.double()).sum(1), atol=1e-3, rtol=1e-5)
    assert torch.equal(got[1].cpu(), init[0]) and bool((dots[[1, 4]] == 0).all())
    with pytest.raises(ValueError, match="scaled_segment_sum takes"):
        kernels.scaled_segment_sum(Xd.to(device), ix.to(device), w.to(device), offsets.to(device),
                                   torch.ones(4, device=device),  # 4 groups of 6 rows
                                   torch.zeros(4, d, device=device), W.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,e", [(64, 2), (64, 1), (16, 8), (5, 5), (130, 3)])
def test_top_experts_are_torch_topk_in_order(device, n, e):
    """`top_experts` against `torch.topk` on router probabilities: the same experts, largest
    first; equal probabilities (a row of ties, a tie at the e-th) lowest column first; NaN above
    every number; every column of a row when e = n; then `route_topk` with and without it."""
    from engine.sae.moe import route_topk

    gen = torch.Generator().manual_seed(n * 10 + e)
    probs = torch.softmax(3 * torch.randn(40, n, generator=gen), dim=-1)
    probs[1] = 1.0 / n  # all tied
    probs[2, : min(n, e + 1)] = probs[2].max() + 0.1  # a tie across the e-th
    probs[3, n // 2] = float("nan")
    got = kernels.top_experts(probs.to(device), e).cpu()
    want = probs.topk(e, dim=-1).indices
    assert got.dtype == torch.long and got.shape == (40, e)
    rest = [r for r in range(40) if r not in (1, 2)]
    assert torch.equal(got[rest], want[rest])
    assert torch.equal(got[1], torch.arange(e)) and torch.equal(got[2], torch.arange(e))
    assert bool((got.sort(1).values[:, 1:] != got.sort(1).values[:, :-1]).all())  # distinct
    if device == "cpu":
        kernels.ENABLED["cpu"] = True
    try:
        for weighting in ("softmax", "binary"):
            p = probs.to(device).requires_grad_()
            S, w = route_topk(p, e, weighting, fast=True)
            p_ref = probs.to(device).requires_grad_()
            S_ref, w_ref = route_topk(p_ref, e, weighting)
            assert torch.equal(S[rest].cpu(), S_ref[rest].cpu())
            assert torch.allclose(w[rest], w_ref[rest], equal_nan=True)
            if weighting == "softmax":
                (w[rest] * torch.arange(e, device=device)).sum().backward()
                (w_ref[rest] * torch.arange(e, device=device)).sum().backward()
                assert torch.allclose(p.grad, p_ref.grad, atol=1e-6, equal_nan=True)
    finally:
        kernels.ENABLED.pop("cpu", None)
    with pytest.raises(ValueError, match="top_experts takes"):
        kernels.top_experts(probs.to(device), n + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P,N,align", [(16384, 64, 16), (37, 5, 16), (1000, 64, 8), (300, 3, 1),
                                       (0, 4, 16)])
def test_expert_plan_and_pack_rows_lay_out_the_grouped_gemms_buffer(device, P, N, align):
    """`expert_plan` against the stable sort by expert it replaces (`moe._gmm_products`'s
    PyTorch form): every pair's buffer row and each group's padded end, experts with no pair
    included, several blocks of pairs; `pack_rows` copies each pair's token row there and
    nothing else."""
    gen = torch.Generator().manual_seed(P + N)
    experts = torch.randint(0, N, (P,), generator=gen)
    if P:
        experts[experts == N - 1] = 0  # an expert with no pair
    counts = torch.bincount(experts, minlength=N)
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(experts, stable=True)
    rank = torch.arange(P) - (torch.cumsum(counts, 0) - counts)[experts[order]]
    want = torch.empty(P, dtype=torch.long)
    want[order] = (ends - padded)[experts[order]] + rank
    dest, got_ends = kernels.expert_plan(experts.to(device), N, align)
    assert dest.dtype == torch.long and got_ends.dtype == torch.int32
    assert torch.equal(dest.cpu(), want) and torch.equal(got_ends.cpu(), ends.int())
    X = torch.randn(max(P // 2, 1), 70, generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, X.shape[0], (P,), generator=gen)
    buf = torch.full((P + N * (align - 1), 70), 7.0, dtype=torch.bfloat16)
    kernels.pack_rows(X.to(device), tokens.to(device), dest, buf_d := buf.to(device))
    written = torch.zeros(buf.shape[0], dtype=torch.bool)
    written[want] = True
    assert torch.equal(buf_d.cpu()[want], X[tokens]) and bool((buf_d.cpu()[~written] == 7).all())
    with pytest.raises(ValueError, match="pack_rows writes"):
        kernels.pack_rows(X.to(device), tokens.to(device), dest, buf_d.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_centred_rows_are_the_difference_rounded_once(device, dtype):
    """`centred_rows` against (X − c).to(dtype): compiled, bit for bit; through Triton's
    interpreter, which rounds to half precision by truncation, within one step of it. Rows of
    a strided X, d not a power of two; float32 inputs only."""
    gen = torch.Generator().manual_seed(9)
    X = torch.randn(37, 150, generator=gen)[:, :131].to(device)  # rows strided
    c = torch.randn(131, generator=gen).to(device)
    got, want = kernels.centred_rows(X, c, dtype), (X - c).to(dtype)
    assert got.dtype == dtype and got.shape == (37, 131)
    if device == "cpu":
        assert torch.allclose(got.float(), want.float(), rtol=2**-7 if dtype == torch.bfloat16
                              else 2**-10, atol=1e-6)
    else:
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="centred_rows takes"):
        kernels.centred_rows(X.double(), c.double(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routed", [True, False], ids=["routed", "dense"])
def test_picks_are_the_gathers_and_index_passes(device, routed):
    """`picks` against the PyTorch passes it replaces (`moe._SparseTopK`): each pick's feature
    (row p % m of the token's expert in slot p // m, or p itself), slot, z = ReLU(pre at the
    pick) in float32 and the codes ReLU(top) in the asked dtype — negative values among them,
    k not a power of two."""
    from engine.sae.moe import _feature_index

    gen = torch.Generator().manual_seed(13)
    B, k, e, m = 21, 7, 3, 10
    n = e * m if routed else 40
    pre = torch.randn(B, n, generator=gen).to(torch.bfloat16)
    experts = torch.stack([torch.randperm(8, generator=gen)[:e] for _ in range(B)]) if routed else None
    pos = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(B)])
    top = torch.randn(B, k, generator=gen).to(torch.bfloat16)
    idx, slot, z, codes = kernels.picks(pos.to(device), top.to(device), pre.to(device),
                                        experts.to(device) if routed else None, m, torch.float32)
    assert torch.equal(idx.cpu(), _feature_index(pos, experts, m))
    assert (slot is None) != routed and (not routed or torch.equal(slot.cpu(), pos // m))
    assert z.dtype == codes.dtype == torch.float32
    assert torch.equal(z.cpu(), pre.gather(1, pos).relu().float())
    assert torch.equal(codes.cpu(), top.relu().float())
    with pytest.raises(ValueError, match="picks takes"):
        kernels.picks(pos.to(device), top[:, :3].to(device), pre.to(device), None, m, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_experts", [0, 11])
def test_pick_grads_are_the_gather_where_and_scatters(device, n_experts):
    """`pick_grads` against the PyTorch passes it replaces (`moe._SparseTopK.backward`): g_pre
    zero where z is (ReLU's gradient), ∂w summed per slot, each token's sums per expert at its
    experts' columns and zero elsewhere — k not a power of two, a slot with no pick."""
    gen = torch.Generator().manual_seed(14)
    B, k, e, N = 19, 9, 3, max(n_experts, 11)
    g = torch.randn(B, k, generator=gen)
    z = torch.randn(B, k, generator=gen).clamp_min(0)
    slot = torch.randint(0, e - 1, (B, k), generator=gen)  # slot e − 1 never picked
    weights = torch.softmax(torch.randn(B, e, generator=gen), -1)
    experts = torch.stack([torch.randperm(N, generator=gen)[:e] for _ in range(B)])
    g_pre, grad_w, per = kernels.pick_grads(*(t.to(device) for t in (g, z, slot, weights, experts)),
                                            n_experts)
    want_pre = torch.where(z > 0, g * weights.gather(1, slot), torch.zeros_like(g))
    want_w = torch.zeros(B, e).scatter_add_(1, slot, g * z)
    assert torch.allclose(g_pre.cpu(), want_pre, atol=1e-6) and bool((g_pre.cpu()[z == 0] == 0).all())
    assert torch.allclose(grad_w.cpu(), want_w, atol=1e-5)
    if n_experts:
        r = torch.zeros(B, e).scatter_add_(1, slot, want_pre)
        want_per = torch.zeros(B, N).scatter_add_(1, experts, r)
        assert per.shape == (B, N) and torch.allclose(per.cpu(), want_per, atol=1e-5)
    else:
        assert per is None
    with pytest.raises(ValueError, match="pick_grads takes"):
        kernels.pick_grads(g.to(device), z[:, :3].to(device), slot.to(device),
                           weights.to(device), experts.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R", [1, 3, 300])
def test_squared_error_and_spread_from_one_read(device, R):
    """`kernels.squared_error` against `F.mse_loss` (sum) and the spread about the mean
    (`base.centred_sq_sum`'s PyTorch form) in float64, with d and R not multiples of the tiles,
    one row included, and rows far from zero (the spread's one-pass form subtracts two large
    sums); `scaled_diff` against mse_loss's backward, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    d = kernels.BLOCKS["loss_d"] + 13
    x = (torch.randn(R, d, generator=gen) * 3 + 40).to(device)
    x_hat = (x.cpu() + torch.randn(R, d, generator=gen)).to(device)
    sse, spread = kernels.squared_error(x_hat, x)
    want_sse = F.mse_loss(x_hat.double(), x.double(), reduction="sum")
    want_spread = (x.double() - x.double().mean(0)).square().sum()
    assert sse.dtype == spread.dtype == torch.float32 and sse.dim() == spread.dim() == 0
    assert torch.allclose(sse.double(), want_sse, rtol=1e-6)
    assert torch.allclose(spread.double(), want_spread, rtol=1e-5, atol=1e-3)
    g = torch.tensor(0.37, device=device)
    x_hat.requires_grad_()
    want_grad, = torch.autograd.grad(F.mse_loss(x_hat, x, reduction="sum"), x_hat, g)
    assert torch.equal(kernels.scaled_diff(x_hat.detach(), x, g), want_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_grads_are_the_dots_and_the_segmented_sum(device):
    """Both decoder gradients from one pass over the picks sorted by feature: the values'
    gradient ⟨G[b], W[idx[b, j]]⟩ and W's Σ acts · G[b] over each feature's picks, against
    the float64 products — a feature picked twice by one token, features no token picked,
    d over several column blocks and not a multiple of one, a segment longer than a block of
    picks."""
    from engine.sae.moe import _feature_groups

    gen = torch.Generator().manual_seed(12)
    B, k, M = 9, 2 * kernels.BLOCKS["segment_p"] + 3, 11
    d = 2 * kernels.BLOCKS["segment_d"] + 5
    G, W = torch.randn(B, d, generator=gen), torch.randn(M, d, generator=gen)
    idx = torch.randint(0, M - 3, (B, k), generator=gen)  # the last three never picked
    idx[0, 1] = idx[0, 0]
    acts = torch.rand(B, k, generator=gen)
    tokens, order, offsets = _feature_groups(idx, M, None)
    got_acts, got_W = kernels.decoder_grads(G.to(device), W.to(device), acts.to(device),
                                            tokens.to(device), order.to(device), offsets.to(device))
    want_acts = (G.double()[:, None, :] * W.double()[idx]).sum(-1)
    want_W = torch.zeros(M, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (acts.double()[:, :, None] * G.double()[:, None, :]).reshape(-1, d))
    assert got_acts.dtype == got_W.dtype == torch.float32
    assert torch.allclose(got_acts.cpu().double(), want_acts, atol=1e-4, rtol=1e-5)
    assert torch.allclose(got_W.cpu().double(), want_W, atol=1e-4, rtol=1e-5)
    assert bool((got_W[-3:] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_segment_sum_gives_the_same_bits_each_time(device):
    """One program per segment walks its rows in order: no atomics, so no run-to-run noise."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 33, generator=gen).to(device)
    ix, w, offsets = _csr([50, 9, 0, 70], 30, gen)
    ix, w, offsets = ix.to(device), w.float().to(device), offsets.to(device)
    a = kernels.segment_sum(X, ix, w, offsets)
    b = kernels.segment_sum(X, ix, w, offsets)
    assert torch.equal(a, b) and a.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 32, 45])  # 45: more picks than one program takes (AuxK)
def test_picked_dots_are_the_dot_products(device, k):
    """⟨G[b], W[idx[b, j]]⟩ by hand, with a feature picked twice by one token, k not a power of
    two, d over several blocks of columns."""
    gen = torch.Generator().manual_seed(2)
    B, M, d = 6, 50, 150
    G = torch.randn(B, d, generator=gen, dtype=torch.float64)
    W = torch.randn(M, d, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, M, (B, k), generator=gen)
    idx[2, -1] = idx[2, 0]
    want = (G[:, None, :] * W[idx]).sum(-1)
    got = kernels.picked_dots(G.to(device), W.to(device), idx.to(device), out_dtype=torch.float64)
    assert torch.allclose(got.cpu(), want, atol=1e-12)
    got32 = kernels.picked_dots(G.float().to(device), W.float().to(device), idx.to(device))
    assert got32.dtype == torch.float32 and torch.allclose(got32.cpu().double(), want, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_the_row_kernels_in_float64_and_their_edges(device):
    """float64 rows stay float64 to 1e-12; a NaN row stays NaN under renormalisation (as
    clamp_min leaves it); in-place kernels refuse a non-contiguous tensor and count as changes
    for autograd; no columns give no dot products."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(9, 70, generator=gen, dtype=torch.float64)
    W = (W / W.norm(dim=1, keepdim=True)).to(device)
    G = torch.randn(9, 70, generator=gen, dtype=torch.float64).to(device)
    want = G - torch.linalg.vecdot(G, W)[:, None] * W
    assert torch.allclose(kernels.project_rows_(G.clone(), W), want, atol=1e-12)
    V = (torch.randn(9, 70, generator=gen, dtype=torch.float64) * 3).to(device)
    assert torch.allclose(kernels.unit_rows_(V.clone()), V / V.norm(dim=1, keepdim=True), atol=1e-12)
    X = torch.randn(3, 3, 70, generator=gen, dtype=torch.float64).to(device)
    s, c = torch.randn(3, dtype=torch.float64).to(device), torch.randn(3, 1, 70, dtype=torch.float64).to(device)
    assert torch.allclose(kernels.group_affine(X, s, c), torch.addcmul(c, X, s[:, None, None]), atol=1e-12)
    N = V.clone()
    N[2, 5] = float("nan")
    out = kernels.unit_rows_(N)
    assert bool(out[2].isnan().all()) and not bool(out[3].isnan().any())
    version = V._version
    kernels.unit_rows_(V)
    assert V._version > version
    with pytest.raises(ValueError, match="contiguous"):
        kernels.unit_rows_(V.t())
    empty = kernels.picked_dots(torch.ones(2, 0, device=device), torch.ones(3, 0, device=device),
                                torch.zeros(2, 2, dtype=torch.long, device=device))
    assert torch.equal(empty.cpu(), torch.zeros(2, 2))


def test_the_kernels_refuse_a_cpu_tensor_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device"):
        kernels.picked_dots(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_the_row_kernels_are_their_pytorch_forms(device):
    """The decoder gradient's projection, the decoder's renormalisation (a zero row stays zero)
    and Feature Scaling's per-expert s_i · X_i + c_i, against the PyTorch lines they replace,
    with d not a power of two and rows not a multiple of a program's."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(37, 70, generator=gen)
    W = W / W.norm(dim=1, keepdim=True)
    G = torch.randn(37, 70, generator=gen)
    want = G - torch.linalg.vecdot(G, W)[:, None] * W
    got = kernels.project_rows_(G.clone().to(device), W.to(device))
    assert torch.allclose(got.cpu(), want, atol=1e-6)
    assert torch.allclose((got.cpu() * W).sum(1), torch.zeros(37), atol=1e-6)  # orthogonal now
    V = torch.randn(37, 70, generator=gen) * 3
    V[5] = 0
    got = kernels.unit_rows_(V.clone().to(device)).cpu()
    assert torch.allclose(got, V / V.norm(dim=1, keepdim=True).clamp_min(1e-8), atol=1e-6)
    assert bool((got[5] == 0).all())
    X = torch.randn(5, 7, 70, generator=gen)
    s, c = torch.randn(5, generator=gen), torch.randn(5, 1, 70, generator=gen)
    got = kernels.group_affine(X.to(device), s.to(device), c.to(device)).cpu()
    assert torch.allclose(got, torch.addcmul(c, X, s[:, None, None]), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "scale"])
def test_a_step_through_the_kernels_equals_the_bags(arch, device, monkeypatch):
    """Codes, losses, every parameter's gradient and the weights after the optimiser step
    (projection, clip, Adam, renormalisation) with the Triton kernels against the same fast
    path in PyTorch (`embedding_bag`, addcmul), AuxK and Feature Scaling included."""
    import copy

    from engine.sae import SAEConfig, build_sae
    from engine.training.schedule import make_adam, optimiser_step

    torch.manual_seed(0)
    sae0 = build_sae(SAEConfig(arch=arch, d_in=12, width=64, experts=4, active=2, k=6)).to(device)
    with torch.no_grad():  # Feature Scaling away from its identity start, so each term counts
        for name, p in sae0.named_parameters():
            if name in ("omega", "T"):
                p.add_(0.1 * torch.randn_like(p))
    x = (torch.randn(24, 12) * 2).to(device)
    dead = torch.zeros(64, dtype=torch.bool, device=device)
    dead[::3] = True
    res = {}
    for on in (False, True):
        monkeypatch.setattr(kernels, "ENABLED", {device: on})
        sae = copy.deepcopy(sae0)
        opt = make_adam(sae.parameters(), 1e-2)
        out = sae(x, dead_mask=dead, auxk_k=5)
        (out.mse + 0.3 * out.lb_loss + 0.7 * out.auxk_loss).backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
        optimiser_step(sae, opt, 1.0)
        res[on] = (out, grads, {n: p.detach().clone() for n, p in sae.named_parameters()})
    (bag, g_bag, w_bag), (tri, g_tri, w_tri) = res[False], res[True]
    # the same picks with the same values; TopK's order is unspecified (torch.topk and the
    # row TopK kernel list them differently)
    assert torch.allclose(sae0.dense_codes(bag.codes), sae0.dense_codes(tri.codes), atol=1e-6)
    assert torch.equal(bag.codes.top_indices.sort(1).values, tri.codes.top_indices.sort(1).values)
    for name in ("mse", "auxk_loss"):
        assert torch.allclose(getattr(bag, name), getattr(tri, name), atol=1e-6), name
    assert g_bag.keys() == g_tri.keys()
    for name, g in g_bag.items():
        assert torch.allclose(g, g_tri[name], atol=1e-5, rtol=1e-4), name
    for name, w in w_bag.items():
        assert torch.allclose(w, w_tri[name], atol=1e-5), name
    assert torch.allclose(w_tri["W_dec"].norm(dim=1), torch.ones(64, device=device), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_the_kernels_fail_on_keeps_pytorch_with_one_warning(device, monkeypatch):
    """`works` tries the kernels once on a tiny case; where they fail to compile or run, it
    warns once and says no (the engine then keeps PyTorch's forms)."""
    dev = torch.device(device)
    assert kernels._try(dev) is True

    def broken(*a, **kw):
        raise RuntimeError("no compiler for this GPU\nsecond line")

    monkeypatch.setattr(kernels, "segment_sum", broken)
    with pytest.warns(RuntimeWarning, match=r"do not run on .* \(no compiler for this GPU\)"):
        assert kernels._try(dev) is False


@pytest.mark.parametrize("device", DEVICES)
def test_this_rounds_fused_passes_failing_leave_the_other_kernels(device, monkeypatch):
    """This round's fused passes are tried apart (`_try_fused`): where one of them fails, one
    warning, `use_fused` says no and `use` still says yes — and a Scale SAE's Feature Scaling
    on CUDA goes back to Ŵ formed with autograd rather than the sums' PyTorch forms."""
    from engine.sae import moe

    dev = torch.device(device)
    assert kernels._try_fused(dev) is True and kernels._try(dev) is True

    def broken(*a, **kw):
        raise RuntimeError("no compiler for this pass")

    with monkeypatch.context() as patched:
        patched.setattr(kernels, "pick_grads", broken)
        with pytest.warns(RuntimeWarning, match=r"fused Triton passes do not run on .* \(no compiler"):
            assert kernels._try_fused(dev) is False
        assert kernels._try(dev) is True
    if device == "cuda":  # the verdict kept for the tensor's device: the step's choices follow it
        x = torch.zeros(2, 4, device=dev)
        monkeypatch.setitem(kernels._FUSED_WORKS, x.device, False)  # cuda:0, not "cuda"
        assert kernels.use(x) and not kernels.use_fused(x)
        monkeypatch.setattr(moe, "CUDA_SCALING", "sums")
        assert not moe.folds_scaling(x, torch.bfloat16)


def test_moesae_triton_0_turns_them_off():
    import subprocess
    import sys

    code = "from engine.sae import kernels; print(kernels.ENABLED['cuda'])"
    env = {**__import__("os").environ, "MOESAE_TRITON": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ROW_STEPS = [*DEVICES, pytest.param("numba", marks=pytest.mark.skipif(
    not cpu_kernels.AVAILABLE, reason="needs numba"))]
"""Where the optimiser's fused passes run: the Triton kernels (on the CPU through the
interpreter, compiled on CUDA) and the CPU's numba kernels, which have the same signatures."""


def _row_step(where: str):
    """(the module, the torch device) for a ROW_STEPS case."""
    return (cpu_kernels, "cpu") if where == "numba" else (kernels, where)


def _projected(G, W):
    """PyTorch's form: each row of G less its component along the unit row of W."""
    return G - torch.linalg.vecdot(G, W)[:, None] * W


@pytest.mark.parametrize("where", ROW_STEPS)
def test_projected_sq_norms_are_those_of_the_projected_rows(where):
    ops, device = _row_step(where)
    gen = torch.Generator().manual_seed(3)
    W = F.normalize(torch.randn(37, 70, generator=gen), dim=1).to(device)
    G = torch.randn(37, 70, generator=gen).to(device)
    want = _projected(G, W).pow(2).sum(1)
    assert torch.allclose(ops.projected_sq_norms(G, W), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ROW_STEPS)
def test_adam_rows_is_project_adam_then_unit_rows(where):
    """Two steps of the fused pass against the projection, the gradient divided by the clip's
    scale, `torch.optim.Adam` (its own fused kernel where it has one) and the rows divided by
    their norms; a zero row stays zero and a row with a NaN stays NaN, as in PyTorch."""
    ops, device = _row_step(where)
    gen = torch.Generator().manual_seed(4)
    R, d = 21, 70
    W0 = F.normalize(torch.randn(R, d, generator=gen), dim=1)
    grads = [torch.randn(R, d, generator=gen) * 3 for _ in range(2)]
    grads[0][5] = 0.0
    W_ref = torch.nn.Parameter(W0.clone().to(device))
    opt = torch.optim.Adam([W_ref], lr=1e-2, betas=(0.9, 0.999))
    W = W0.clone().to(device)
    m1, m2 = torch.zeros_like(W), torch.zeros_like(W)
    step = torch.zeros((), device=device)
    for t, G in enumerate(grads):
        G = G.to(device)
        scale = torch.full((), 1.5 + t, device=device)
        W_ref.grad = _projected(G, W_ref.detach()) / scale
        opt.step()
        with torch.no_grad():
            W_ref.div_(W_ref.norm(dim=1, keepdim=True).clamp_min(1e-8))
        step.add_(1)
        ops.adam_rows_(W, G, m1, m2, 1e-2, step, scale, (0.9, 0.999), 1e-8, decoder=True)
        assert torch.allclose(W, W_ref.detach(), rtol=1e-5, atol=1e-6)
        # the second step projects onto rows that differ from the reference's by their rounding
        assert torch.allclose(m1, opt.state[W_ref]["exp_avg"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(m2, opt.state[W_ref]["exp_avg_sq"], rtol=1e-5, atol=1e-8)
    W_nan = W.clone()
    W_nan[2, 3] = float("nan")
    ops.adam_rows_(W_nan, torch.zeros_like(W), m1.clone(), m2.clone(), 1e-2, step,
                   torch.ones((), device=device), (0.9, 0.999), 1e-8, decoder=True)
    assert bool(W_nan[2].isnan().all()) and not bool(W_nan[3].isnan().any())


@pytest.mark.parametrize("scaled", [False, True], ids=["bias", "scale, offset and bias"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_rows_is_the_gathered_bias_add_scattered_back(device, dtype, scaled):
    """Bit for bit the composed PyTorch epilogue, with m not a power of two and padding rows
    in Y that no pair reads (compiled; Triton's interpreter rounds to bfloat16 by truncation,
    so there within one bfloat16 step); with Feature Scaling folded in, each sorted pair's
    row times its expert's scale plus its pair's offset, in float32 before the one rounding."""
    gen = torch.Generator().manual_seed(5)
    P, m, N = 45, 24, 6
    Y = torch.randn(P + 20, m, generator=gen).to(device, dtype)
    dest = torch.randperm(P + 20, generator=gen)[:P].to(device)
    order = torch.randperm(P, generator=gen).to(device)
    expert = torch.randint(0, N, (P,), generator=gen).to(device)
    b = torch.randn(N, m, generator=gen).to(device, dtype)
    rows = Y[dest].float()
    extra = {}
    if scaled:
        scale = (torch.rand(N, generator=gen) + 0.5).to(device)
        offset = torch.randn(P, generator=gen).to(device)
        rows = rows * scale[expert, None] + offset[order, None]
        extra = {"scale": scale, "offset": offset}
    want = (rows + b.float()[expert]).to(dtype)
    want = want.new_empty(P, m).index_copy(0, order, want)
    got = kernels.expert_rows(Y, dest, order, expert, b, dtype, **extra)
    if device == "cpu" and dtype == torch.bfloat16:
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
    elif scaled:  # compiled, y · s + offset may be one fused multiply-add: one rounding less
        step = 2**-7 if dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(got.float(), want.float(), rtol=step, atol=step)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_sums_are_the_column_sums_and_dots(device, dtype):
    """m and d not multiples of the blocks (partial blocks both ways)."""
    gen = torch.Generator().manual_seed(6)
    N, m, d = 3, kernels.BLOCKS["sums_rows"] + 5, kernels.BLOCKS["sums_d"] + 7
    G = torch.randn(N, m, d, generator=gen, dtype=torch.float64)
    W = torch.randn(N, m, d, generator=gen, dtype=torch.float64)
    colsum, dots = kernels.group_sums(G.to(device, dtype), W.to(device, dtype))
    assert colsum.shape == (N, 1, d) and dots.shape == (N,) and colsum.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(colsum.cpu().double(), G.sum(1, keepdim=True), rtol=tol, atol=tol)
    assert torch.allclose(dots.cpu().double(), (G * W).sum((1, 2)), rtol=tol, atol=tol)


# (values' dtype, BLOCKS["topk_narrow"]): 16-bit values' keys as 32-bit or 64-bit integers;
# float32 values' keys are 64-bit whatever the switch says
ROW_TOPK_KEYS = [pytest.param(torch.float32, 1, id="float32"),
                 *(pytest.param(dt, narrow, id=f"{name}-{bits}-bit keys")
                   for dt, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"))
                   for narrow, bits in ((1, 32), (0, 64)))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,narrow", ROW_TOPK_KEYS)
@pytest.mark.parametrize("n,k", [(40, 7), (768, 32), (100, 100), (5, 1), (300, 288)])
@pytest.mark.parametrize("early", [1, 0], ids=["early exit", "full bisection"])
def test_row_topk_is_torch_topk(device, dtype, narrow, n, k, early, monkeypatch):
    """The same values as torch.topk (NaN of either sign above +inf, ±inf, ±0, ties, a row
    all −inf as AuxK's masked candidates), each at its position, k distinct positions — with
    16-bit values' keys as 32-bit or 64-bit integers."""
    monkeypatch.setitem(kernels.BLOCKS, "topk_early", early)
    monkeypatch.setitem(kernels.BLOCKS, "topk_narrow", narrow)
    gen = torch.Generator().manual_seed(n + k)
    f = torch.randn(9, n, generator=gen)
    f[1] = f[1].round()  # ties at the k-th value
    f[2, 3], f[2, 7 % n] = float("nan"), -float("nan")
    f[3] = float("-inf")
    f[4, :4] = float("inf")
    f[5] = 0.0
    f[5, ::2] = -0.0
    f[6] = 1e-40  # subnormal in float32
    f = f.to(device, dtype)
    vals, pos = kernels.row_topk(f, k)
    want = f.topk(k, dim=-1).values

    def key(v):
        return v.float().nan_to_num(nan=float("inf")).cpu()

    assert torch.equal(key(vals.sort(-1, descending=True).values), key(want))
    assert torch.equal(key(f.gather(1, pos)), key(vals))
    assert all(len(set(row.tolist())) == k for row in pos.cpu())
    assert int(vals[2].isnan().sum()) == min(2, k)  # the NaNs first, as torch.topk


def test_row_topk_refuses_what_it_cannot_hold():
    f = torch.zeros(2, kernels.TOPK_MAX_N + 1)
    with pytest.raises(ValueError):
        kernels.row_topk(f, 3)


@pytest.mark.parametrize("where", ROW_STEPS)
def test_adam_rows_without_the_decoders_passes_is_adam(where):
    """The encoder's pass: the clip's scale and torch's Adam, nothing else (no projection, no
    renormalisation), over three steps."""
    ops, device = _row_step(where)
    gen = torch.Generator().manual_seed(7)
    W0 = torch.randn(13, 70, generator=gen)
    W_ref = torch.nn.Parameter(W0.clone().to(device))
    opt = torch.optim.Adam([W_ref], lr=1e-2, betas=(0.9, 0.999))
    W = W0.clone().to(device)
    m1, m2, step = torch.zeros_like(W), torch.zeros_like(W), torch.zeros((), device=device)
    for t in range(3):
        G = (torch.randn(13, 70, generator=gen) * 2).to(device)
        scale = torch.full((), 1.0 + t, device=device)
        W_ref.grad = G / scale
        opt.step()
        step.add_(1)
        ops.adam_rows_(W, G, m1, m2, 1e-2, step, scale, (0.9, 0.999), 1e-8, decoder=False)
        assert torch.allclose(W, W_ref.detach(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(m1, opt.state[W_ref]["exp_avg"], rtol=1e-5, atol=1e-7)
        assert torch.allclose(m2, opt.state[W_ref]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_the_fused_adam_fails_on_keeps_the_passes_apart(device, monkeypatch):
    """`adam_works` tries the fused optimiser pass once on a tiny case (both forms); where it
    fails, one warning and no (the optimiser keeps PyTorch's passes)."""
    dev = torch.device(device)
    assert kernels._try_adam(dev) is True
    real = kernels.adam_rows_

    def wrong(W, *a, **kw):  # the encoder's form gives other numbers
        out = real(W, *a, **kw)
        return out if kw.get("decoder") else out + 1

    monkeypatch.setattr(kernels, "adam_rows_", wrong)
    with pytest.warns(RuntimeWarning, match=r"fused optimiser passes do not run on .*other numbers"):
        assert kernels._try_adam(dev) is False
