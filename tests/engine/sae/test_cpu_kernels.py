"""The numba kernels of engine/sae/cpu_kernels.py against the PyTorch kernels they replace on
the CPU: `torch.topk`, `embedding_bag`'s per-sample-weights backward, and a stable argsort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sae import SAEConfig, build_sae, cpu_kernels, moe

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="needs numba")


@pytest.fixture
def torch_kernels():
    """Within the test, `cpu_kernels.use` says no: the engine's PyTorch forms run instead."""
    cpu_kernels.ENABLED = False
    yield
    cpu_kernels.ENABLED = True


def _same_topk(f: torch.Tensor, k: int) -> None:
    """The kernel's picks are a top k of each row: the values `torch.topk` finds (NaN as the
    largest), at distinct positions that hold them."""
    vals, pos = cpu_kernels.topk(f, k)
    ref = f.topk(k, dim=-1).values.sort(-1).values
    assert vals.shape == pos.shape == (f.shape[0], k) and pos.dtype == torch.long
    assert torch.equal(vals.sort(-1).values.nan_to_num(7e37), ref.nan_to_num(7e37))
    assert torch.equal(f.gather(1, pos).nan_to_num(7e37), vals.nan_to_num(7e37))
    assert bool((pos.sort(-1).values.diff(dim=-1) > 0).all())  # no position twice


@pytest.mark.parametrize("n", [40, 64, 288, 576, 1023, 1100, 2048, 4608])
@pytest.mark.parametrize("k", [1, 7, 32])
def test_topk_is_torch_topk(n, k):
    """Both ways of a row's search: every value a candidate (short rows) and the bound from
    block maxima (rows of at least LONG_ROW·k values, not a multiple of the block)."""
    gen = torch.Generator().manual_seed(n * 100 + k)
    f = torch.randn(150, n, generator=gen)
    _same_topk(f, k)
    _same_topk(f * 1e-30, k)  # subnormal and tiny values order as their integer keys say
    _same_topk(-f.abs(), k)  # all negative


def test_topk_with_ties_nan_and_infinities():
    """Ties at the k-th value (any tied positions do), NaN counted above +inf (either sign
    of NaN), rows of −inf (AuxK's masked candidates), ±0, and k equal to the row."""
    gen = torch.Generator().manual_seed(0)
    for n in (100, 4096):
        f = torch.randn(12, n, generator=gen)
        f[0, :50] = 0.5  # 50 ties around the k-th value
        f[0, 60:] = -1.0
        f[1, 3] = float("nan")
        f[2, 7], f[2, 9] = float("nan"), -float("nan")
        f[3] = -float("inf")  # every candidate masked
        f[4, ::2] = -float("inf")
        f[5, 10] = float("inf")
        f[6] = 0.0
        f[6, ::3] = -0.0
        f[7, :40] = float("inf")
        f[8] = torch.randint(0, 3, (n,), generator=gen).float()  # few distinct values
        for k in (1, 32):
            _same_topk(f, k)
        vals, pos = cpu_kernels.topk(f, 32)
        assert int(torch.isnan(vals[2]).sum()) == 2 and int(torch.isnan(vals[1]).sum()) == 1
    full = torch.randn(5, 9, generator=gen)
    _same_topk(full, 9)


def test_topk_empty_and_bad_k():
    vals, pos = cpu_kernels.topk(torch.empty(0, 50), 5)
    assert vals.shape == pos.shape == (0, 5)
    with pytest.raises(ValueError, match="k = 6 for rows of 5"):
        cpu_kernels.topk(torch.zeros(2, 5), 6)


def test_use_says_where_they_run(torch_kernels):
    x = torch.zeros(3, 4)
    assert not cpu_kernels.use(x)  # switched off (MOESAE_NUMBA=0 does the same)
    cpu_kernels.ENABLED = True
    assert cpu_kernels.use(x)
    assert not cpu_kernels.use(x.double()) and not cpu_kernels.use(x.bfloat16())


def test_picked_dots_is_the_bag_kernel(torch_kernels):
    """⟨g[b], W[idx[b, j]]⟩ for every pick, a feature picked twice by one token included."""
    gen = torch.Generator().manual_seed(2)
    g, W = torch.randn(64, 70, generator=gen), torch.randn(30, 70, generator=gen)
    idx = torch.randint(0, 30, (64, 9), generator=gen)
    idx[0, 1] = idx[0, 0]
    ref = moe._picked_dots(idx, g, W)  # embedding_bag's kernel: cpu_kernels switched off
    got = cpu_kernels.picked_dots(g, W, idx)
    exact = torch.einsum("bd,bjd->bj", g.double(), W.double()[idx])
    assert torch.allclose(got.double(), exact, atol=1e-4) and torch.allclose(got, ref, atol=1e-4)


def test_group_sums_are_feature_scalings_two_reductions():
    """Against `sum` over the rows and `vecdot` per expert, in float64; with more experts than
    threads, one expert, and rows not a multiple of the vector width."""
    gen = torch.Generator().manual_seed(9)
    for N, m, d in [(5, 7, 37), (1, 3, 16), (16, 40, 24)]:
        G, W = torch.randn(N, m, d, generator=gen), torch.randn(N, m, d, generator=gen)
        col, dot = cpu_kernels.group_sums(G, W)
        assert col.shape == (N, 1, d) and dot.shape == (N,)
        assert torch.allclose(col.double(), G.double().sum(1, keepdim=True), atol=1e-4)
        assert torch.allclose(dot.double(), (G.double() * W.double()).sum((1, 2)), atol=1e-3)


def test_sort_picks_is_a_stable_argsort():
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 20, (50, 6), generator=gen)
    starts, order = cpu_kernels.sort_picks(idx, 25)  # rows 20..24 never named
    counts = torch.bincount(idx.reshape(-1), minlength=25)
    assert torch.equal(starts, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(order, torch.argsort(idx.reshape(-1), stable=True))
    starts2, order2, rank = cpu_kernels.sort_picks(idx, 25, ranks=True)
    assert torch.equal(starts2, starts) and torch.equal(order2, order)
    assert torch.equal(rank, moe._inverse(order))


@pytest.mark.parametrize("k", [1, 3, 8], ids=lambda k: f"k{k}")
def test_decoder_grads_are_the_dots_and_the_segmented_sum(k):
    """Both decoder gradients from one pass: rows with no picks (zeros), with fewer than four,
    with a multiple of four and with more; a token naming a row twice. Against the bag's
    backward written out densely, in float64."""
    gen = torch.Generator().manual_seed(k)
    B, M, d = 60, 30, 37
    idx = torch.randint(0, M - 4, (B, k), generator=gen)  # rows 26..29 never named
    idx[0, :] = 5  # a row named k times by one token
    acts, g, W = torch.rand(B, k, generator=gen), torch.randn(B, d, generator=gen), torch.randn(M, d, generator=gen)
    starts, order = cpu_kernels.sort_picks(idx, M)
    dots, gW = cpu_kernels.decoder_grads(g, W, acts, starts, order)
    want_dots = (g.double()[:, None] * W.double()[idx]).sum(-1)
    want_gW = torch.zeros(M, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), acts.double().reshape(-1, 1) * g.double().repeat_interleave(k, 0))
    assert torch.allclose(dots.double(), want_dots, atol=1e-4)
    assert torch.allclose(gW.double(), want_gW, atol=1e-4) and bool((gW[26:] == 0).all())


def test_scatter_rows_gives_the_same_bits(torch_kernels):
    """The encoder's and decoder's weight gradients: the counting sort hands embedding_bag the
    same segments in the same order as the argsort, so the sums are bit-identical."""
    gen = torch.Generator().manual_seed(4)
    x, g = torch.randn(256, 48, generator=gen), torch.randn(256, 8, generator=gen)
    idx = torch.randint(0, 90, (256, 8), generator=gen)
    ref = moe._scatter_rows(idx, g, x, 100)
    cpu_kernels.ENABLED = True
    got = moe._scatter_rows(idx, g, x, 100)
    dense = torch.zeros(100, 48).index_add_(0, idx.reshape(-1),
                                            g.reshape(-1, 1) * x.repeat_interleave(8, 0))
    assert torch.equal(got, ref) and torch.allclose(got, dense, atol=1e-5)
    assert bool((got[90:] == 0).all())


@pytest.mark.parametrize("arch,active", [("topk", 1), ("switch", 1), ("scale", 2)])
def test_a_training_step_is_the_same_with_either_kernels(arch, active, torch_kernels):
    """Forward codes, loss and every parameter's gradient of a step with AuxK, numba's
    kernels against PyTorch's: the same picks, and values to float32 rounding (a router's
    logits are summed in another order)."""
    cfg = SAEConfig(arch=arch, d_in=24, width=192, experts=4, active=active, k=8)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 24, generator=gen)
    dead = torch.zeros(192, dtype=torch.bool)
    dead[::5] = True
    results = []
    for on in (False, True):
        cpu_kernels.ENABLED = on
        torch.manual_seed(0)
        sae = build_sae(cfg)
        out = sae(x, dead_mask=dead, auxk_k=12)
        (out.mse + out.auxk_loss + 0.1 * out.lb_loss).backward()
        z = sae.dense_codes(out.codes)
        results.append((z, out.mse.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()
                                               if p.grad is not None}))
    (z0, l0, g0), (z1, l1, g1) = results
    assert torch.equal(z0 != 0, z1 != 0) and torch.allclose(z0, z1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(l0, l1, rtol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("auxk", [False, True], ids=["no AuxK", "AuxK"])
def test_a_step_sorts_its_picks_once_for_both_weight_gradients(auxk, monkeypatch):
    """The decoder's backward sorts the TopK picks by feature (one counting sort) and takes
    both its gradients from one pass; the encoder's weight gradient reuses that sort, unless
    AuxK adds picks of its own to the encoder's."""
    assert cpu_kernels.works()  # its one try made before counting
    calls = {"sort_picks": 0, "decoder_grads": 0}
    for name in calls:
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _real=real, _name=name, **kw:
                            calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **kw))
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="scale", d_in=24, width=192, experts=4, active=2, k=8))
    x = torch.randn(300, 24)
    dead = torch.ones(192, dtype=torch.bool) if auxk else None
    out = sae(x, dead_mask=dead, auxk_k=12 if auxk else None)
    (out.mse + (out.auxk_loss if auxk else 0)).backward()
    # one more sort in the forward: the (token, expert) pairs by expert for the experts' matrix
    # products; with AuxK also the aux picks' own decode (a sort and a pass of their own) and the
    # encoder's sort of its TopK and AuxK picks together
    assert calls == {"sort_picks": 1 + (3 if auxk else 1), "decoder_grads": 2 if auxk else 1}


def test_rows_split_across_threads_give_the_same_picks():
    """With several threads each takes its own range of rows (at least MIN_ROWS): the picks
    and dot products are those of one thread."""
    gen = torch.Generator().manual_seed(6)
    B = 3 * cpu_kernels.MIN_ROWS + 5
    f = torch.randn(B, 300, generator=gen)
    g, W = torch.randn(B, 40, generator=gen), torch.randn(50, 40, generator=gen)
    idx = torch.randint(0, 50, (B, 6), generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.topk(f, 16), cpu_kernels.picked_dots(g, W, idx)
        torch.set_num_threads(3)
        many = cpu_kernels.topk(f, 16), cpu_kernels.picked_dots(g, W, idx)
    finally:
        torch.set_num_threads(threads)
    assert cpu_kernels._POOL["workers"] >= 2
    assert torch.equal(one[0][0], many[0][0]) and torch.equal(one[0][1], many[0][1])
    assert torch.equal(one[1], many[1])
    _same_topk(f, 16)


def _topk_in_child(queue, f, expected):
    # only the kernel runs here: after a fork, PyTorch's own OpenMP threads are gone too, and
    # its parallel kernels would wait for them (GNU OpenMP is not fork-safe)
    torch.set_num_threads(2)
    vals, _ = cpu_kernels.topk(f, 8)
    queue.put(bool((np.sort(vals.numpy(), axis=1) == expected).all()))


def test_a_forked_child_makes_its_own_pool():
    """A forked child's copy of the pool has no threads: it makes its own instead of waiting
    forever on the parent's."""
    import multiprocessing as mp

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cpu_kernels.topk(torch.randn(2 * cpu_kernels.MIN_ROWS, 100), 8)  # the parent's pool
    finally:
        torch.set_num_threads(threads)
    f = torch.randn(2 * cpu_kernels.MIN_ROWS, 100)
    expected = np.sort(f.topk(8).values.numpy(), axis=1)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_topk_in_child, args=(queue, f, expected))
    child.start()
    child.join(120)
    assert child.exitcode == 0 and queue.get(timeout=5)


def _expert_rows_case(seed, B, e, N, m):
    """A routed TopK's inputs: each token's e distinct experts, their weights, the pairs' buffer
    of products in any layout (`rows` names each token's), the experts' biases."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(N, generator=gen)[:e] for _ in range(B)])
    w = torch.rand(B, e, generator=gen) + 0.1
    pre = torch.randn(B * e, m, generator=gen)
    bias = torch.randn(N, m, generator=gen)
    rows = torch.randperm(B * e, generator=gen).view(B, e)
    return gen, experts, w, pre, bias, rows


def test_topk_expert_rows_reads_the_pairs_where_the_encode_left_them():
    """Each token's candidates are its experts' rows of the pairs' buffer, plus the expert's
    bias, times its weight, in slot order; with a dead mask, only dead features compete."""
    B, e, N, m, k = 40, 3, 5, 11, 6
    gen, experts, w, pre, bias, rows = _expert_rows_case(7, B, e, N, m)
    f = torch.stack([torch.cat([w[b, s] * (pre[rows[b, s]] + bias[experts[b, s]])
                                for s in range(e)]) for b in range(B)])
    vals, pos, z, u, features, slots = cpu_kernels.topk_expert_rows(pre, bias, rows, w, experts, k)
    assert torch.equal(vals.sort(-1).values, f.topk(k).values.sort(-1).values)
    assert torch.equal(f.gather(1, pos), vals)
    assert torch.allclose(z * w.gather(1, pos // m), vals)  # z: before weighting
    slot = pos // m
    assert torch.equal(u, pre[rows.gather(1, slot), pos % m])  # u: the products at the picks
    assert torch.equal(slots, slot) and torch.equal(features, moe._feature_index(pos, experts, m))
    dead = torch.rand(N * m, generator=gen) < 0.3
    is_dead = dead.view(N, m)[experts].reshape(B, e * m)
    masked = f.masked_fill(~is_dead, float("-inf"))
    vals, pos, *_ = cpu_kernels.topk_expert_rows(pre, bias, rows, w, experts, 2, dead)
    assert torch.equal(vals.sort(-1).values, masked.topk(2).values.sort(-1).values)


def test_topk_expert_rows_scales_and_shifts_each_pair_s_products():
    """With `Scaling`, a pair's products p become scale_i · p + offset[b, s] before the bias and
    the weight: the same TopK as the candidates written out, in float64; u stays p."""
    B, e, N, m, k = 30, 2, 4, 9, 5
    gen, experts, w, pre, bias, rows = _expert_rows_case(8, B, e, N, m)
    scale = torch.rand(N, generator=gen) + 0.5
    offset = torch.randn(B, e, generator=gen)
    z_all = torch.stack([torch.cat([scale[experts[b, s]] * pre[rows[b, s]].double() + offset[b, s]
                                    + bias[experts[b, s]] for s in range(e)]) for b in range(B)])
    f = z_all * w.double().repeat_interleave(m, 1)
    vals, pos, z, u, *_ = cpu_kernels.topk_expert_rows(pre, bias, rows, w, experts, k,
                                                   scaling=cpu_kernels.Scaling(scale, offset))
    assert torch.allclose(vals.double().sort(-1).values, f.topk(k).values.sort(-1).values, atol=1e-5)
    assert torch.allclose(f.gather(1, pos), vals.double(), atol=1e-5)
    assert torch.allclose(z.double(), z_all.gather(1, pos), atol=1e-5)
    assert torch.equal(u, pre[rows.gather(1, pos // m), pos % m])


@pytest.mark.parametrize("e", [1, 2, 3])
def test_centre_rows_is_the_subtraction_and_each_pair_s_offset(e):
    gen = torch.Generator().manual_seed(e)
    B, d, N = 300, 37, 5
    x, c, shift = (torch.randn(*s, generator=gen) for s in ((B, d), (d,), (N, d)))
    experts = torch.stack([torch.randperm(N, generator=gen)[:e] for _ in range(B)])
    x_c, offset = cpu_kernels.centre_rows(x, c, experts, shift)
    assert torch.equal(x_c, x - c)
    expected = (x_c.double()[:, None, :] * shift.double()[experts]).sum(-1)
    assert torch.allclose(offset.double(), expected, atol=1e-4)


def test_pick_scale_sums_against_scatter_add():
    gen = torch.Generator().manual_seed(4)
    B, k, e, N = 70, 9, 3, 6
    experts = torch.stack([torch.randperm(N, generator=gen)[:e] for _ in range(B)])
    slot = torch.randint(0, e, (B, k), generator=gen)
    g, u = torch.randn(B, k, generator=gen), torch.randn(B, k, generator=gen)
    scale = torch.rand(N, generator=gen) + 0.5
    g_rows, r, r_u = cpu_kernels.pick_scale_sums(g, slot, experts, u, scale)
    assert torch.allclose(g_rows, g * scale[experts.gather(1, slot)])
    assert torch.allclose(r, torch.zeros(B, e).scatter_add_(1, slot, g), atol=1e-6)
    assert torch.allclose(r_u, torch.zeros(B, e).scatter_add_(1, slot, g * u), atol=1e-6)


@pytest.mark.parametrize("B", [1, 255, 1000])
def test_expert_sums_against_index_add(B):
    """Blocks of `SUM_BLOCK` rows summed apart (one row, a part block, several blocks)."""
    gen = torch.Generator().manual_seed(B)
    d, e, N = 19, 2, 7
    x, r = torch.randn(B, d, generator=gen), torch.randn(B, e, generator=gen)
    experts = torch.stack([torch.randperm(N, generator=gen)[:e] for _ in range(B)])
    got = cpu_kernels.expert_sums(x, experts, r, N)
    expected = torch.zeros(N, d, dtype=torch.float64).index_add_(
        0, experts.reshape(-1), (r.double()[:, :, None] * x.double()[:, None, :]).reshape(-1, d))
    assert got.shape == (N, d) and torch.allclose(got.double(), expected, atol=1e-4)


@pytest.mark.parametrize("B", [0, 1, 257, 2000])
def test_centred_sq_sum_is_the_fvu_s_denominator(B):
    """Σ‖x − mean x‖² from one pass of float64 sums, against float64 torch — with an offset 100×
    the spread, where float32 sums of x² would lose the centred part."""
    gen = torch.Generator().manual_seed(B)
    x = torch.randn(B, 33, generator=gen) * 0.01 + torch.randn(33, generator=gen)
    got = cpu_kernels.centred_sq_sum(x)
    x64 = x.double()
    expected = (x64 - x64.mean(0)).square().sum() if B else torch.zeros((), dtype=torch.float64)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-9)


def test_kernels_that_do_not_run_leave_pytorch_s_with_one_warning(monkeypatch):
    """A numba that cannot import beside this numpy, or a kernel that does not compile: one
    warning line, and `use` says no for the rest of the process."""
    def broken():
        raise ImportError("Numba needs NumPy 2.3 or less")

    monkeypatch.setattr(cpu_kernels, "_jit", broken)
    monkeypatch.setattr(cpu_kernels, "_WORKS", [])
    with pytest.warns(RuntimeWarning, match=r"numba kernels do not run here \(Numba needs NumPy"):
        assert not cpu_kernels.use(torch.zeros(2, 3))
    assert not cpu_kernels.use(torch.zeros(2, 3))  # tried once
    monkeypatch.setattr(cpu_kernels, "_WORKS", [])
    monkeypatch.undo()
    assert cpu_kernels.use(torch.zeros(2, 3))


@pytest.mark.parametrize("M", [1, 13, 300])
def test_segment_sums_is_embedding_bag_over_the_sorted_picks(M):
    """The encoder's weight gradient: rows with no picks (zeros), one pick, fewer than four,
    and many; against `embedding_bag` with per-sample weights over the same sorted picks."""
    gen = torch.Generator().manual_seed(M)
    B, k, d = 97, 7, 23
    idx = torch.randint(0, M, (B, k), generator=gen)
    x, g = torch.randn(B, d, generator=gen), torch.randn(B, k, generator=gen)
    starts, order = cpu_kernels.sort_picks(idx, M)
    tokens, w = order // k, g.reshape(-1)[order]
    got = cpu_kernels.segment_sums(x, tokens, w, starts)
    expected = torch.nn.functional.embedding_bag(tokens, x, starts[:-1], mode="sum",
                                                 per_sample_weights=w)
    assert got.shape == (M, d) and torch.allclose(got, expected, atol=1e-5)
    # the weights read in their own places through `order`: the same sums, bit for bit
    assert torch.equal(cpu_kernels.segment_sums(x, tokens, g.reshape(-1), starts, order=order), got)
    if M % 4 == 0:  # each group of M / 4 rows started from its row of `init`
        init = torch.randn(4, d, generator=gen)
        started = cpu_kernels.segment_sums(x, tokens, w, starts, init=init)
        assert torch.allclose(started, got + init.repeat_interleave(M // 4, 0), atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 4, 9])
def test_decode_rows_starts_each_row_from_the_bias(k):
    gen = torch.Generator().manual_seed(k)
    B, M, d = 300, 40, 19
    idx = torch.randint(0, M, (B, k), generator=gen)
    acts, W, bias = (torch.randn(*s, generator=gen) for s in ((B, k), (M, d), (d,)))
    bag = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=acts, mode="sum")
    assert torch.allclose(cpu_kernels.decode_rows(acts, idx, W, bias), bag + bias, atol=1e-5)
    assert torch.allclose(cpu_kernels.decode_rows(acts, idx, W), bag, atol=1e-5)


@pytest.mark.parametrize("B", [0, 1, 257, 2000])
def test_squared_error_and_its_gradient(B):
    gen = torch.Generator().manual_seed(B)
    a, b = torch.randn(B, 31, generator=gen), torch.randn(B, 31, generator=gen)
    got, spread = cpu_kernels.squared_error(a, b)
    assert got.dtype == spread.dtype == torch.float32 and got.dim() == spread.dim() == 0
    assert torch.allclose(got.double(), (a.double() - b.double()).square().sum(), rtol=1e-6)
    assert torch.allclose(spread, cpu_kernels.centred_sq_sum(b), rtol=1e-6)
    assert torch.allclose(cpu_kernels.scaled_diff(a, b, 0.5), 0.5 * (a - b), atol=1e-7)
    grad, sums = cpu_kernels.scaled_diff(a, b, 0.5, column_sums=True)  # blocks of SUM_BLOCK rows
    assert torch.allclose(grad, 0.5 * (a - b), atol=1e-7) and sums.shape == (31,)
    assert torch.allclose(sums.double(), 0.5 * (a.double() - b.double()).sum(0), atol=1e-4)


def test_the_squared_error_function_is_mse_loss_forward_and_backward(numba_kernels):
    from engine.sae.base import squared_error

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 17, generator=gen)
    x_hat = torch.randn(300, 17, generator=gen, requires_grad=True)
    ref_hat = x_hat.detach().clone().requires_grad_(True)
    sse, spread = squared_error(x_hat, x)
    ref = torch.nn.functional.mse_loss(ref_hat, x, reduction="sum")
    assert torch.allclose(spread, ((x.double() - x.double().mean(0)) ** 2).sum().float(), rtol=1e-5)
    (3 * sse).backward()
    (3 * ref).backward()
    assert torch.allclose(sse, ref, rtol=1e-5)
    assert torch.allclose(x_hat.grad, ref_hat.grad, atol=1e-5)


@pytest.mark.parametrize("B,N", [(1, 16), (7, 3), (300, 16), (1001, 6)])
def test_centred_products_are_the_router_s_logits(B, N):
    """Tokens and rows of W in fours and the ones left over."""
    gen = torch.Generator().manual_seed(B + N)
    x, c, W = torch.randn(B, 45, generator=gen), torch.randn(45, generator=gen), torch.randn(N, 45, generator=gen)
    logits, x_c = cpu_kernels.centred_products(x, c, W)
    assert torch.equal(x_c, x - c)
    assert torch.allclose(logits.double(), (x.double() - c.double()) @ W.double().T, atol=1e-4)


def test_the_first_try_is_not_misled_by_autocast(monkeypatch):
    """The tiny case runs in float32 whatever autocast its first caller is under (a bf16
    context once made PyTorch's side of it bf16, and the kernels were switched off)."""
    monkeypatch.setattr(cpu_kernels, "_WORKS", [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.works()
