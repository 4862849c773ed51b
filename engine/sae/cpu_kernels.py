"""Numba kernels for the sparse step on the CPU.

Parts of a CPU training step ran as PyTorch kernels that do per-row or per-pick work one
element at a time, or as copies between them (torch profiler, the benchmark's Scale e=2 step:
B 4,096, d 576, M 4,608, N 16, k 32, two threads):

| step (METHOD §1)                             | PyTorch                                  | here |
|----------------------------------------------|------------------------------------------|------|
| TopK_k of each token's candidates f [B, n]   | `torch.topk`: a partial sort of (value, index) pairs per row | `topk` |
| a routed SAE's candidates concat_i w_i · (W_i x + b_i) and their TopK | the experts' blocks concatenated, put back in token order, weighted, then `torch.topk` | `topk_expert_rows` |
| ∂z[b, j] = ⟨∂x̂[b], W_dec[idx[b, j]]⟩        | `embedding_bag`'s per-sample-weights backward | `picked_dots` |
| the picks grouped by feature for ∂W_enc, ∂W_dec | a stable `argsort` and the counts | `sort_picks` (a counting sort) |
| ∂z and ∂W_dec together                        | the two above, two passes over the picks | `decoder_grads`, one |
| Feature Scaling's Σ_j G_i and ⟨G_i, W_i⟩ (METHOD §3) | `sum` and `vecdot` (which writes the products and reads them back) | `group_sums`, one read |
| the decoder's step (METHOD §3): ∂W_dec projected, clipped, Adam, rows to unit norm | four passes (`vecdot` + `addcmul_`, the clip's norm, fused Adam, `norm` + `div_`) | `projected_sq_norms` + `adam_rows_`, two |
| Feature Scaling folded into the encode: Ŵ_i x = s_i · (W_i x) + ⟨c_i, x⟩ (METHOD §3) | Ŵ written out each step (a pass over the M·d weights), and its gradient's two more | `centre_rows` (x − b_dec and the ⟨c_i, x⟩ in one read), `topk_expert_rows` with a `Scaling`, and for the backward `pick_scale_sums` and `expert_sums` |
| the FVU's denominator Σ‖x − mean x‖² | `x − x.mean(0)` and its norm: three reads and a write | `centred_sq_sum`, one read, float64 sums |
| ∂W_enc [M, d] = Σ over feature f's picks of ∂pre · x_c[b] | `embedding_bag` over the picks sorted by feature | `segment_sums` |
| the decode x̂[b] = b_dec + Σ_j z[b, j] · W_dec[idx[b, j]] | `embedding_bag`, then the bias added in a pass of its own | `decode_rows`, each row started from the bias |
| a router's logits (x − b) · W_gᵀ [B, N] | `x − b`, then MKL's product, slow for N of 16 | `centred_products`, x − b and the logits from one read of x |
| the squared error Σ‖x̂ − x‖² (and the FVU's denominator) and its gradient 2(x̂ − x) | `F.mse_loss` (the squared differences written out, then summed; the denominator another read of x) and its backward | `squared_error` (both from one read of each, float64 sums), `scaled_diff` |

`topk` finds each row's k largest without sorting anything: by bisection on order-preserving
integer keys of the floats (an int32 whose order is the float's; every NaN above +inf, as
`torch.topk` orders them), counting the keys at or above the midpoint in a vectorised pass,
and stopping as soon as exactly k are. A short row's search starts between t, the smallest
of the maxima of its k strided groups {j : j mod k = q} (k distinct keys reach it, so t is
at most the k-th largest), and its largest key. Long rows (dense TopK's M candidates) first
take t as the k-th largest of the maxima of blocks of L keys, and only blocks whose maximum
reaches t are searched, once at most 4k of their keys remain at or above the lower end only
those. The picks are every key above the k-th largest, then as many equal to it as make k
(with ties, any of the tied positions may be returned, as with `torch.topk`). The kernels'
loops read their rows through slices indexed from 0: with indices computed as q·L + j,
numba's handling of negative indices kept LLVM from vectorising them (the chunk maxima ran
as gathers, the block maxima one value at a time).

The kernels (engine/sae/_cpu_jit.py, imported at the first call) are compiled by numba at
their first call (cached on disk beside the file, or in numba's user cache where that is
read-only), release the GIL, and run on as many threads as PyTorch has, each taking chunks of
rows (`_split_rows`). `use` decides where they run: float32 CPU tensors, numba installed, not
`MOESAE_NUMBA=0`, and the kernels working on a tiny case (`works`). The tests
(tests/engine/sae/test_cpu_kernels.py) hold them to the PyTorch forms.
"""

from __future__ import annotations

import importlib.util
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether numba is installed (it comes with umap-learn); without it the engine keeps
PyTorch's kernels."""

ENABLED = os.environ.get("MOESAE_NUMBA", "1") != "0"
"""`MOESAE_NUMBA=0` in the environment keeps PyTorch's kernels on the CPU."""

MIN_ROWS = 256
"""Rows a thread takes at least: smaller calls run on the calling thread alone."""

CHUNKS_PER_THREAD = 8
"""Chunks of rows per thread in `_split_rows`'s queue."""

SUM_BLOCK = 256
"""Rows per partial sum in the kernels that sum over tokens (`centred_sq_sum`,
`expert_sums`): each block's sums are written apart and added up after, so no two threads
write one sum."""


def _jit():
    """engine/sae/_cpu_jit.py, imported at the first kernel call (numba's import costs ~0.15 s
    of every command's start otherwise)."""
    from . import _cpu_jit

    return _cpu_jit


def use(t: Tensor, values: bool = True) -> bool:
    """Whether the numba kernels run for tensor `t`: on the CPU, float32 (unless it is not
    `values`, as the picks `sort_picks` sorts), numba installed, and the kernels working
    (`works`)."""
    return (ENABLED and AVAILABLE and t.device.type == "cpu"
            and (t.dtype == torch.float32 or not values) and works())


_WORKS: list[bool] = []


def works() -> bool:
    """Whether the kernels compile and give PyTorch's answers on a tiny case: tried once per
    process, at the first call of `use` (which compiles them, or loads them from numba's disk
    cache). Where they do not — a numba that does not import beside this numpy, a compiler
    error — one warning line says so and the engine keeps PyTorch's kernels."""
    if not _WORKS:
        _WORKS.append(_try())
    return _WORKS[0]


def _try() -> bool:
    import warnings

    try:  # whatever autocast the first call finds itself in: the references in float32
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            return _tiny_case()
    except Exception as exc:  # any failure to import, compile or run: PyTorch's kernels instead
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(f"The numba kernels do not run here ({why}); training uses PyTorch's "
                      "kernels on the CPU, which are slower.", RuntimeWarning, stacklevel=3)
        return False


def _tiny_case() -> bool:
    """The kernels against PyTorch on a tiny case: True, or an exception saying why not."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(3, 70, generator=gen)
    vals, pos = topk(f, 4)
    W, g = torch.randn(6, 5, generator=gen), torch.randn(3, 5, generator=gen)
    idx = torch.tensor([[0, 5], [2, 2], [1, 4]])
    rows = torch.tensor([[0, 1], [2, 3], [4, 5]])
    experts = torch.tensor([[0, 1], [2, 0], [1, 2]])
    ev, epos, _, _, ef, es = topk_expert_rows(W, torch.zeros(3, 5), rows, torch.ones(3, 2),
                                              experts, 3)
    sv = topk_expert_rows(W, torch.zeros(3, 5), rows, torch.ones(3, 2), experts, 3,
                          scaling=Scaling(torch.full((3,), 2.0), torch.ones(3, 2))).values
    x_c, offset = centre_rows(g, g[0], experts, W[:3])
    g_rows, r, r_u = pick_scale_sums(g[:, :2], idx % 2, experts, g[:, 2:4], torch.ones(3))
    starts, order = sort_picks(idx, 6)
    dots, gW = decoder_grads(g, W, g[:, :2], starts, order)
    # Adam's first step from zero moments moves each weight by lr · G / (|G| + eps')
    P, m1, m2 = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
    adam_rows_(P, W, m1, m2, 0.5, torch.ones(()), torch.full((), 2.0), (0.9, 0.999), 0.0,
               decoder=False)
    G3, W3 = W.view(2, 3, 5), g.repeat(2, 1).view(2, 3, 5)
    col, dot = group_sums(G3, W3)
    bag = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=g[:, :2], mode="sum")
    seg = segment_sums(g, order // 2, g[:, 2:4].reshape(-1)[order], starts)
    seg_in_place = segment_sums(g, order // 2, g[:, 2:4].reshape(-1), starts, order=order)
    seg_init = segment_sums(g, order // 2, g[:, 2:4].reshape(-1), starts, order=order,
                            init=W[:2])
    diff, diff_sums = scaled_diff(g, W[:3], 2.0, column_sums=True)
    logits, g_c = centred_products(g, g[1], W)
    ok = (torch.equal(vals.sort(-1).values, f.topk(4).values.sort(-1).values)
          and torch.allclose(col, G3.sum(1, keepdim=True), atol=1e-5)
          and torch.allclose(dot, (G3 * W3).sum((1, 2)), atol=1e-4)
          and torch.allclose(P, W - 0.5 * W.sign(), atol=1e-5)
          and torch.allclose(projected_sq_norms(g, W[:3]),
                             (g - (g * W[:3]).sum(1, keepdim=True) * W[:3]).square().sum(1),
                             rtol=1e-4, atol=1e-5)
          and torch.equal(ev.sort(-1).values, W.view(3, 10).topk(3).values.sort(-1).values)
          and torch.equal(es, epos // 5)
          and torch.equal(ef, experts.gather(1, epos // 5) * 5 + epos % 5)
          and torch.allclose(sv.sort(-1).values, 2 * ev.sort(-1).values + 1)
          and torch.equal(x_c, g - g[0])
          and torch.allclose(offset, (x_c[:, None] * W[:3][experts]).sum(-1), atol=1e-5)
          and torch.equal(g_rows, g[:, :2])
          and torch.allclose(r, torch.zeros(3, 2).scatter_add_(1, idx % 2, g[:, :2]))
          and torch.allclose(r_u, torch.zeros(3, 2).scatter_add_(1, idx % 2, g[:, :2] * g[:, 2:4]))
          and torch.allclose(expert_sums(g, experts, r, 3), torch.zeros(3, 5).index_add_(
              0, experts.reshape(-1), (r[:, :, None] * g[:, None]).reshape(-1, 5)), atol=1e-5)
          and torch.allclose(centred_sq_sum(g), (g - g.mean(0)).square().sum(), atol=1e-4)
          and torch.allclose(picked_dots(g, W, idx), (g[:, None] * W[idx]).sum(-1), atol=1e-5)
          and starts.tolist() == [0, 1, 2, 4, 4, 5, 6] and order.tolist() == [0, 4, 2, 3, 5, 1]
          and torch.allclose(dots, picked_dots(g, W, idx), atol=1e-5)
          and torch.allclose(decode_rows(g[:, :2], idx, W, g[0]), bag + g[0], atol=1e-5)
          and torch.allclose(seg, torch.zeros_like(W).index_add_(
              0, idx.reshape(-1), g[:, 2:4].reshape(-1, 1) * g.repeat_interleave(2, 0)),
              atol=1e-5)
          and torch.allclose(squared_error(g, W[:3])[0], (g - W[:3]).square().sum(), atol=1e-4)
          and torch.allclose(scaled_diff(g, W[:3], 2.0), 2 * (g - W[:3]), atol=1e-6)
          and torch.equal(seg_in_place, seg) and torch.equal(diff, scaled_diff(g, W[:3], 2.0))
          and torch.allclose(seg_init, seg + W[:2].repeat_interleave(3, 0), atol=1e-6)
          and torch.allclose(diff_sums, diff.sum(0), atol=1e-5)
          and torch.equal(g_c, g - g[1]) and torch.allclose(logits, g_c @ W.T, atol=1e-5)
          and torch.allclose(gW, torch.zeros_like(W).index_add_(
              0, idx.reshape(-1), g[:, :2].reshape(-1, 1) * g.repeat_interleave(2, 0)),
              atol=1e-5))
    if not ok:
        raise RuntimeError("they gave other numbers than PyTorch on a tiny case")
    return True


_POOL: dict = {"pid": None, "workers": 0, "pool": None}


def _split_rows(kernel, B: int, *args, min_rows: int = MIN_ROWS) -> None:
    """kernel(lo, hi, *args) over rows [0, B), on as many threads as PyTorch has (each with at
    least `min_rows` rows): the calling thread and a pool of threads take chunks of rows from
    one shared queue until it is empty, so a thread that starts late (its core still busy
    with PyTorch's spinning OpenMP workers, which engine/openmp.py keeps brief) takes fewer.
    The kernels release the GIL, so the chunks run at once. A pool rather than numba's own
    threads: numba's OpenMP layer loads a libgomp of its own beside PyTorch's, whose workers
    spin after each parallel region, and on a 2-core machine that spinning took the cores from
    PyTorch's next kernels and from the other process of a data-parallel run (3× slower steps
    there); these threads sleep. The pool is made again in a forked child, whose copy has no
    threads."""
    parts = max(1, min(torch.get_num_threads(), B // min_rows))
    if parts == 1:
        kernel(0, B, *args)
        return
    pool = _POOL["pool"]
    if _POOL["pid"] != os.getpid() or _POOL["workers"] < parts - 1:
        if pool is not None and _POOL["pid"] == os.getpid():
            pool.shutdown(wait=False)  # a smaller pool of this process: its threads end
        pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="moesae-cpu")
        _POOL.update(pid=os.getpid(), workers=parts - 1, pool=pool)
    n = min(B, parts * CHUNKS_PER_THREAD)
    cuts = [B * i // n for i in range(n + 1)]
    queue = iter(range(n))  # next() on it runs under the GIL: each chunk is taken once

    def work():
        for i in queue:
            kernel(cuts[i], cuts[i + 1], *args)

    rest = [pool.submit(work) for _ in range(parts - 1)]
    work()
    for fut in rest:
        fut.result()


BLOCK = 16
"""Values per block of `topk`'s bound."""

LONG_ROW = 64
"""Rows of at least LONG_ROW·k values take the bound from block maxima; shorter rows search
all their values at once. Measured on the development CPU (2 threads, 4,096 rows, k 32, ms;
2026-11-27, the kernels of d94cf84 and after: short rows' bounds from strided groups, long
rows' block maxima in keys; a dash where fewer than k blocks make no bound):

| values a row | torch.topk | all values | blocks of 8 | blocks of 16 | blocks of 32 |
|---:|---:|---:|---:|---:|---:|
| 288 | 7.39 | **1.37** | 2.79 | – | – |
| 576 | 12.48 | **1.98** | 3.25 | 3.48 | – |
| 1,152 | 21.84 | **2.86** | 3.79 | 3.46 | 4.07 |
| 2,304 | 21.80 | 5.53 | 5.96 | **5.04** | 5.43 |
| 4,608 | 32.13 | 12.81 | 11.58 | **8.94** | 8.87 |

(With the kernels before d94cf84 the long path paid off from 1,152 values, LONG_ROW 32.)
"""


def block_length(n: int, k: int) -> int:
    """L for rows of n values (0: no blocks, every value a candidate)."""
    return BLOCK if n >= LONG_ROW * k else 0


def topk(f: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`f.topk(k, dim=-1, sorted=False)` for f [B, n] float32 on the CPU, as the module
    docstring describes; positions as int64."""
    B, n = f.shape
    if not 0 < k <= n:
        raise ValueError(f"topk: k = {k} for rows of {n} values")
    f = f.contiguous()
    vals = torch.empty(B, k, dtype=f.dtype)
    pos = torch.empty(B, k, dtype=torch.long)
    if B:
        _split_rows(_jit()._topk_rows, B, f.numpy(), k, block_length(n, k), vals.numpy(), pos.numpy())
    return vals, pos


class Scaling(NamedTuple):
    """Feature Scaling folded into a routed SAE's expert encode (METHOD §3): expert i's encoder
    rows taken as Ŵ_i = scale_i · W_i + shift_i, so that a pair's products are
    Ŵ_i x = scale_i · (W_i x) + ⟨shift_i, x⟩ without Ŵ written out. scale [N]; offset [B, e]
    the pairs' ⟨shift_i, x⟩ (`centre_rows`)."""

    scale: Tensor
    offset: Tensor


class ExpertPicks(NamedTuple):
    """What `topk_expert_rows` finds for each token, [B, k] each."""

    values: Tensor
    """The picks' weighted values (before the ReLU)."""
    positions: Tensor
    """Their positions s·m + j among the token's candidates (slot s, row j)."""
    z: Tensor
    """Their pre-activations before weighting."""
    u: Tensor
    """The products `pre` at the picks (before Feature Scaling's scale and offset)."""
    features: Tensor
    """Their features: expert i's row j is feature i·m + j."""
    slots: Tensor
    """Their slots s."""


def topk_expert_rows(pre: Tensor, bias: Tensor, rows: Tensor, w: Tensor, experts: Tensor,
                     k: int, dead: Tensor | None = None, scaling: Scaling | None = None,
                     ) -> ExpertPicks:
    """The TopK of each token over its experts' weighted candidates, read where the expert
    encode left them: pre [P, m] float32 holds one row of m products W_i x per (token, expert)
    pair, bias [N, m] the experts' biases, rows [B, e] names each token's rows (in slot order),
    w [B, e] their weights, experts [B, e] the experts. The candidates of token b are
    concat_s w[b, s] · (pre[rows[b, s]] + bias[experts[b, s]]) — what `moe._weighted` of the
    pairs put back in token order gives, without that copy, the weighted one, or the bias
    written into each expert's block before its matmul. With `dead` [M] (AuxK) a feature that
    is not dead counts as −inf. With `scaling`, each product p of token b's slot s (expert i)
    first becomes scale_i · p + offset[b, s] (`Scaling`).

    Returns the picks (`ExpertPicks`)."""
    B, e = rows.shape
    m = pre.shape[1]
    if not 0 < k <= e * m:
        raise ValueError(f"topk: k = {k} for rows of {e * m} values")
    vals = torch.empty(B, k, dtype=torch.float32)
    pos = torch.empty(B, k, dtype=torch.long)
    z = torch.empty(B, k, dtype=torch.float32)
    u = torch.empty(B, k, dtype=torch.float32)
    features = torch.empty(B, k, dtype=torch.long)
    slots = torch.empty(B, k, dtype=torch.long)
    use_dead = dead is not None
    dead_np = (dead if use_dead else torch.zeros(1, dtype=torch.bool)).contiguous().numpy()
    if scaling is None:
        scale, offset = np.ones(1, np.float32), np.zeros((1, 1), np.float32)
    else:
        scale, offset = (t.detach().to(torch.float32).contiguous().numpy() for t in scaling)
    if B:
        _split_rows(_jit()._topk_expert_rows, B, pre.contiguous().numpy(),
                    bias.to(torch.float32).contiguous().view(-1).numpy(), rows.contiguous().numpy(),
                    w.to(torch.float32).contiguous().numpy(), experts.contiguous().numpy(),
                    dead_np, use_dead, scale, offset, scaling is not None, k,
                    block_length(e * m, k), vals.numpy(), pos.numpy(), z.numpy(), u.numpy(),
                    features.numpy(), slots.numpy())
    return ExpertPicks(vals, pos, z, u, features, slots)


def centre_rows(x: Tensor, centre: Tensor, experts: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """(x − centre [B, d], ⟨shift[experts[b, s]], x[b] − centre⟩ [B, e]) for float32 x [B, d],
    centre [d], experts [B, e], shift [N, d] on the CPU, from one read of x: the centred tokens
    and, with Feature Scaling folded in, the pairs' offsets (`Scaling`), each formed while its
    row is in cache rather than by a second pass over the [B, d] tokens."""
    B, d = x.shape
    out = torch.empty(B, d, dtype=torch.float32)
    offset = torch.empty(experts.shape, dtype=torch.float32)
    if B:
        _split_rows(_jit()._centre_rows, B, x.detach().contiguous().numpy(),
                    centre.detach().to(torch.float32).contiguous().numpy(),
                    experts.contiguous().numpy(),
                    shift.detach().to(torch.float32).contiguous().numpy(), out.numpy(),
                    offset.numpy())
    return out, offset


def pick_scale_sums(g: Tensor, slot: Tensor, experts: Tensor, u: Tensor,
                    scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For float32 g, u [B, k] over each token's picks (from slots slot [B, k] of experts
    experts [B, e]) and scale [N] on the CPU: (g · scale of each pick's expert [B, k], Σ of g
    over each slot's picks [B, e], Σ of g · u over them [B, e]) in one pass over the picks —
    with Feature Scaling folded in, what the backward needs of the picks' gradients g."""
    B, k = g.shape
    g_rows = torch.empty(B, k, dtype=torch.float32)
    r = torch.empty(experts.shape, dtype=torch.float32)
    r_u = torch.empty(experts.shape, dtype=torch.float32)
    if B:
        _split_rows(_jit()._pick_scale_rows, B, g.contiguous().numpy(), slot.contiguous().numpy(),
                    experts.contiguous().numpy(), u.contiguous().numpy(),
                    scale.detach().to(torch.float32).contiguous().numpy(), g_rows.numpy(),
                    r.numpy(), r_u.numpy())
    return g_rows, r, r_u


def expert_sums(x: Tensor, experts: Tensor, r: Tensor, n_experts: int) -> Tensor:
    """[N, d] float32: Σ_b Σ_s r[b, s] · x[b] into row experts[b, s], for float32 x [B, d],
    r [B, e] and experts [B, e] on the CPU — with Feature Scaling folded in, the gradient of
    each expert's shift (Σ over its picks of ∂pre · x). Partial sums over blocks of
    `SUM_BLOCK` rows."""
    B, d = x.shape
    n = -(-B // SUM_BLOCK)
    acc = np.empty((max(n, 1), n_experts, d), np.float32)
    if B == 0:
        return torch.zeros(n_experts, d, dtype=torch.float32)
    _split_rows(_jit()._expert_sum_rows, n, x.detach().contiguous().numpy(),
                experts.contiguous().numpy(), r.detach().to(torch.float32).contiguous().numpy(),
                SUM_BLOCK, acc, min_rows=max(1, n // 8))
    return torch.from_numpy(acc).sum(0)


def sort_picks(idx: Tensor, n_rows: int, ranks: bool = False) -> tuple[Tensor, ...]:
    """The picks idx [B, k] sorted by the row they name, stable (by token within a row), as a
    counting sort in two passes over the picks: (starts [n_rows + 1], where each row's picks
    begin; order [B·k], each sorted pick's position in idx.reshape(-1)) — what a stable
    `torch.argsort` and the counts' cumulative sum give. With `ranks`, also each pick's
    position in that order [B·k] (the inverse permutation), from the same pass."""
    starts = torch.empty(n_rows + 1, dtype=torch.long)
    order = torch.empty(idx.numel(), dtype=torch.long)
    rank = torch.empty(idx.numel() if ranks else 0, dtype=torch.long)
    _jit()._sort_picks(idx.reshape(-1).contiguous().numpy(), n_rows, starts.numpy(), order.numpy(),
                       rank.numpy())
    return (starts, order, rank) if ranks else (starts, order)


def decoder_grads(g: Tensor, W: Tensor, acts: Tensor, starts: Tensor,
                  order: Tensor) -> tuple[Tensor, Tensor]:
    """Both gradients of the decode x̂[b] = Σ_j acts[b, j] · W[idx[b, j]] for float32 g [B, d],
    W [M, d], acts [B, k] on the CPU, from the picks sorted by row (`sort_picks`): (∂acts
    [B, k] = ⟨g[b], W[idx[b, j]]⟩, ∂W [M, d] = Σ over row f's picks of acts · g[b]) in one
    pass over the rows, where `picked_dots` and a segmented sum make two."""
    B, k = acts.shape
    dots = torch.empty(B, k, dtype=torch.float32)
    gW = torch.empty(W.shape, dtype=torch.float32)
    if W.shape[0]:
        _split_rows(_jit()._decoder_grads_rows, W.shape[0], starts.numpy(), order.numpy(), k,
                    acts.detach().contiguous().view(-1).numpy(), g.contiguous().numpy(),
                    W.detach().contiguous().numpy(), dots.view(-1).numpy(), gW.numpy())
    return dots, gW


def centred_products(x: Tensor, c: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """((x − c) · Wᵀ [B, N], x − c [B, d]) for float32 x [B, d], c [d], W [N, d] on the CPU,
    from one read of x: a router's logits, four tokens against four of its rows at a time
    (MKL ran this skinny product at a third of the speed it reaches on square ones)."""
    B, d = x.shape
    out = torch.empty(B, W.shape[0], dtype=torch.float32)
    x_c = torch.empty(B, d, dtype=torch.float32)
    if B:
        _split_rows(_jit()._centred_products_rows, B, x.detach().contiguous().numpy(),
                    c.detach().contiguous().numpy(), W.detach().contiguous().numpy(),
                    out.numpy(), x_c.numpy())
    return out, x_c


def segment_sums(x: Tensor, tokens: Tensor, w: Tensor, starts: Tensor,
                 order: Tensor | None = None, init: Tensor | None = None) -> Tensor:
    """[R, d] float32: row f = Σ over q in [starts[f], starts[f + 1]) of w[q] · x[tokens[q]],
    for float32 x [B, d] and w [P] on the CPU — what `embedding_bag(tokens, x, starts[:-1],
    mode="sum", per_sample_weights=w)` computes (R = len(starts) − 1): an encoder's weight
    gradient from its picks sorted by feature (`sort_picks`). With `order`, w is in the picks'
    own order and sorted pick q's weight is w[order[q]] (read in place: no gathered copy). With
    `init` [G, d] (G dividing R), each row's sum starts from init[f // (R / G)]: a gradient
    shared by each group of R / G rows, added without a pass of its own."""
    R = starts.numel() - 1
    out = torch.empty(R, x.shape[1], dtype=torch.float32)
    group = R // init.shape[0] if init is not None and init.shape[0] else 1
    if R:
        _split_rows(_jit()._segment_sum_rows, R, starts.numpy(), tokens.numpy(),
                    w.detach().to(torch.float32).contiguous().numpy(),
                    None if order is None else order.contiguous().numpy(),
                    x.detach().contiguous().numpy(),
                    None if init is None else init.detach().to(torch.float32).contiguous().numpy(),
                    group, out.numpy())
    return out


def decode_rows(acts: Tensor, idx: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
    """[B, d] float32: bias + Σ_j acts[b, j] · W[idx[b, j]] for float32 acts [B, k], W [M, d]
    and bias [d] (zeros when None) on the CPU — the decode, each token's row started from the
    bias and its picked rows added four at a time (where `embedding_bag` and a second pass for
    the bias took ~20 % longer at B 4,096, k 32, M 4,608, d 576)."""
    B, k = idx.shape
    out = torch.empty(B, W.shape[1], dtype=torch.float32)
    b = bias.detach() if bias is not None else torch.zeros(W.shape[1], dtype=torch.float32)
    if B:
        _split_rows(_jit()._decode_rows, B, idx.contiguous().numpy(),
                    acts.detach().contiguous().numpy(), W.detach().contiguous().numpy(),
                    b.contiguous().numpy(), out.numpy())
    return out


def picked_dots(g: Tensor, W: Tensor, idx: Tensor) -> Tensor:
    """[B, k]: ⟨g[b], W[idx[b, j]]⟩ for float32 g [B, d] and W [M, d] on the CPU; the dot
    products vectorised over d (float32 sums, reassociated)."""
    B, k = idx.shape
    out = torch.empty(B, k, dtype=g.dtype)
    if B:
        _split_rows(_jit()._picked_dots_rows, B, g.contiguous().numpy(), W.contiguous().numpy(),
                    idx.contiguous().numpy(), out.numpy())
    return out


def projected_sq_norms(G: Tensor, W: Tensor) -> Tensor:
    """[R] float32: ‖G[r] − ⟨G[r], W[r]⟩ · W[r]‖² for float32 G, W [R, d] on the CPU — the
    squared norms of the decoder gradient's rows as projected, without writing them (what the
    gradient clip needs ahead of `adam_rows_`; `kernels.projected_sq_norms` on a GPU)."""
    R = G.shape[0]
    out = torch.empty(R, dtype=torch.float32)
    if R:
        _split_rows(_jit()._projected_sq_rows, R, G.detach().contiguous().numpy(),
                    W.detach().contiguous().numpy(), out.numpy())
    return out


def adam_rows_(W: Tensor, G: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               lr: float | Tensor, step: Tensor, scale: Tensor, betas: tuple[float, float],
               eps: float, decoder: bool, unit_eps: float = 1e-8) -> Tensor:
    """`kernels.adam_rows_` on the CPU: a weight's optimiser step in one pass over its rows,
    in place (float32, contiguous [R, d]): the gradient divided by the clip's `scale` and
    torch's Adam update (`step`, the state's count, already incremented), with `decoder` the
    gradient projected first and the rows put back to unit norm after; G is left as it was.
    As torch's fused Adam, the bias corrections in double precision, 1 − β rounded once."""
    tensors = (W, G, exp_avg, exp_avg_sq)
    if any(t.dtype != torch.float32 or t.shape != W.shape or t.dim() != 2
           or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        raise ValueError("adam_rows_ takes float32 contiguous [R, d] CPU weights, gradient and moments")
    t = float(step)
    beta1, beta2 = betas
    f32 = np.float32
    step_size = f32(float(lr) / (1.0 - beta1 ** t))
    bc2_sqrt = f32(math.sqrt(1.0 - beta2 ** t))
    if W.shape[0]:
        _split_rows(_jit()._adam_rows, W.shape[0], *(x.detach().numpy() for x in tensors),
                    step_size, bc2_sqrt, f32(float(scale)), f32(beta1), f32(beta2),
                    f32(1.0 - beta1), f32(1.0 - beta2), f32(eps), f32(unit_eps), bool(decoder))
    for x in (W, exp_avg, exp_avg_sq):
        torch.autograd.graph.increment_version(x)
    return W


def group_sums(G: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """`kernels.group_sums` on the CPU: (Σ_j G[i, j, :] as [N, 1, d], Σ_j ⟨G[i, j, :],
    W[i, j, :]⟩ as [N]) for float32 G, W [N, m, d] — Feature Scaling's two reductions of its
    backward from one read of G and W, the experts split across the threads; float32 sums,
    reassociated."""
    N, _, d = G.shape
    colsum = torch.empty(N, d, dtype=torch.float32)
    dots = torch.empty(N, dtype=torch.float32)
    if N:
        _split_rows(_jit()._group_sums_rows, N, G.contiguous().numpy(),
                    W.detach().contiguous().numpy(), colsum.numpy(), dots.numpy(), min_rows=1)
    return colsum.unsqueeze(1), dots


def centred_sq_sum(x: Tensor) -> Tensor:
    """Σ_b ‖x[b] − mean_b x‖² for float32 x [B, d] on the CPU, as Σ‖x[b]‖² − ‖Σ_b x[b]‖² / B
    from one read of x, both sums in float64 (where `x − x.mean(0)` and its norm read x three
    times and write it once): the FVU's denominator, as `squared_error` gives it beside a
    reconstruction (here x's own: its rows read twice from cache). A float32 0-dim tensor."""
    return squared_error(x, x)[1]



def squared_error(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ (a − b)², Σ_r ‖b[r] − mean_r b‖²) for float32 a, b [B, d] on the CPU, from one read
    of each, in float64 partial sums over blocks of `SUM_BLOCK` rows: the squared error of a
    reconstruction a of b and the FVU's denominator (`centred_sq_sum` of b), where
    `F.mse_loss(reduction="sum")` writes the squared differences out and sums them again in
    float32 and the denominator reads b once more. Two float32 0-dim tensors."""
    B, d = b.shape
    if B == 0:
        return torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    n = -(-B // SUM_BLOCK)
    err, colsum, sqsum = np.empty(n, np.float64), np.empty((n, d), np.float64), np.empty(n, np.float64)
    _split_rows(_jit()._sq_err_rows, n, a.detach().contiguous().numpy(),
                b.detach().contiguous().numpy(), SUM_BLOCK, err, colsum, sqsum,
                min_rows=max(1, n // 8))
    total = colsum.sum(0)
    spread = max(0.0, float(sqsum.sum()) - float(total @ total) / B)
    return (torch.tensor(float(err.sum()), dtype=torch.float32),
            torch.tensor(spread, dtype=torch.float32))


def scaled_diff(a: Tensor, b: Tensor, scale: float, column_sums: bool = False):
    """scale · (a − b) for float32 a, b [B, d] on the CPU, in one pass: the squared error's
    gradient. With `column_sums`, (that, its sum over the rows [d]) from the same pass —
    partial sums over blocks of `SUM_BLOCK` rows, added after: what a bias added to every row
    of the reconstruction needs as its gradient."""
    out = torch.empty(a.shape, dtype=torch.float32)
    a_np, b_np = a.detach().contiguous().numpy(), b.detach().contiguous().numpy()
    if not column_sums:
        if a.shape[0]:
            _split_rows(_jit()._scaled_diff_rows, a.shape[0], a_np, b_np, np.float32(scale),
                        out.numpy())
        return out
    n = -(-a.shape[0] // SUM_BLOCK)
    colsum = torch.zeros(max(n, 1), a.shape[1], dtype=torch.float32)
    if n:
        _split_rows(_jit()._scaled_diff_sum_rows, n, a_np, b_np, np.float32(scale), SUM_BLOCK,
                    out.numpy(), colsum.numpy(), min_rows=max(1, n // 8))
    return out, colsum.sum(0)
