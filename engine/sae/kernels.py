"""Triton kernels for the sparse decoder and the sparse encoder backward (CUDA).

Three products of an SAE step touch only the k picks of each token, and PyTorch's
`embedding_bag` ran all of them at the paper's size on an H100 (~0.39 ms each, float32
master weights, 1.5 of the Scale step's 4 ms; benchmarks/profile_gpu.py):

| product (METHOD §1)                 | as a segmented sum                                         |
|-------------------------------------|------------------------------------------------------------|
| decode x̂[b] = Σ_j z[b, j] · W_dec[idx[b, j]] | `segment_sum(W_dec, idx, z, offsets = 0, k, 2k, …)` |
| ∂W[f] = Σ_(b, j) with idx[b, j] = f of g[b, j] · x[b] | `segment_sum(x, tokens sorted by feature, g, starts)` |
| ∂z[b, j] = ⟨∂x̂[b], W_dec[idx[b, j]]⟩ | `picked_dots(∂x̂, W_dec, idx)` |

`segment_sum` is one program per (segment, block of columns): it walks its segment's rows
in a fixed order, so it is deterministic (no atomics) and a rerun gives the same bits.
Accumulation is float32 (float64 where an input is float64), whatever the output's dtype.

Three more replace passes over the M·d weights that PyTorch runs as two kernels or as its
strided (broadcasting) kernel: `project_rows_` (the decoder gradient's component along each
unit row removed, METHOD §3), `unit_rows_` (the decoder rows back to unit norm) and
`group_affine` (Feature Scaling's Ŵ_i = s_i · W_i + c_i and the same form in its backward).

And these fuse what PyTorch runs as several passes (each measured in a recorded step on an
H100 at the paper's size, benchmarks/profile_gpu.py; README table 7):

| kernel | replaces |
|---|---|
| `adam_rows_` (+ `projected_sq_norms` for the clip) | the decoder's projection, the clip, fused Adam's update of the decoder and the renormalisation: one pass over the decoder, its gradient and moments |
| `row_topk` | `torch.topk` over a routed SAE's e·m candidates a token (a radix select in four kernels) |
| `expert_rows` | the grouped GEMM's epilogue: a gather, the bias added in float32 (and with Feature Scaling folded in, each pair's scale and offset), the rounding and the scatter back into pair order |
| `group_sums` | Feature Scaling's Σ_j G_i[j] and ⟨G_i, W_i⟩ (a sum, and vecdot's products written and read back) |
| `squared_error`, `scaled_diff` | the loss and the FVU's denominator (`F.mse_loss`, a mean, a subtraction and a norm) and the loss's backward |
| `decoder_grads` | both decoder gradients (`picked_dots` and a `segment_sum`, each gathering every pick's row of ∂x̂) |

And seven more (2026-11-27, afternoon), tried apart from the kernels above on first use
(`use_fused`); with the row TopK's 32-bit keys and b_dec's gradient from the bf16 weights, the
round took 0.34 ms off a 1.79 ms Scale e=2 step on an H100:

| kernel | replaces |
|---|---|
| `scaled_segment_sum` | Feature Scaling's backward: `group_sums` and a pass over W's gradient after the encoder's segmented sum (the scale, the means' share and each row's dot product with W now inside it) |
| `expert_plan`, `pack_rows` | the grouped GEMM's layout by a radix sort by expert and a dozen small passes, and its buffer by a gather and `index_copy_` |
| `top_experts` | `torch.topk` over the router's probabilities |
| `centred_rows` | x − centre in float32, then its cast to bf16 |
| `picks` | the TopK picks' features, slots, z and codes by a gather, two ReLUs, two casts and five index passes |
| `pick_grads` | the picks' backward by a gather, a where and three scatter-adds into zeroed tensors |

The kernels are plain Python functions, compiled by `triton.jit` at their first use on a CUDA
device (`use` decides, and tries them once per device: `works`); the tests run the same
functions through Triton's interpreter on the CPU (`interpreted()`) and compiled on CUDA,
against the PyTorch forms they replace.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch ships without triton: the engine uses embedding_bag
    triton = None
    tl = None

BLOCKS: dict[str, int] = {"segment_d": 128, "segment_p": 8, "segment_warps": 1,
                          "dots_k": 32, "dots_d": 32, "dots_warps": 1, "row_elems": 4096,
                          "row_warps": 4, "adam_elems": 1024, "adam_warps": 2,
                          "sums_rows": 32, "sums_d": 128, "sums_warps": 4,
                          "topk_elems": 4096, "topk_warps": 4, "topk_early": 0, "topk_narrow": 1,
                          "route_elems": 1024, "route_warps": 4,
                          "plan_elems": 16384, "plan_parts": 32768, "plan_warps": 4,
                          "pack_rows": 32, "pack_d": 64, "pack_warps": 4,
                          "picks_elems": 1024, "picks_warps": 4,
                          "pick_grads_elems": 2048, "pick_grads_warps": 4,
                          "loss_rows": 256, "loss_block": 16, "loss_d": 64,
                          "loss_total": 1024, "loss_warps": 4,
                          "diff_elems": 2048, "diff_warps": 4}
"""Tile sizes: the columns and rows a `segment_sum` program handles at once and its warps; the
picks a `picked_dots` program takes (at most; fewer where a token has fewer), the columns it
reads at once and its warps; the elements (whole rows, padded to
a power of two) a row kernel's program holds and its warps (benchmarks/profile_gpu.py --parts
kernels times the choices; these were the fastest on an H100 at the paper's size: 0.088 ms
for the decode, 0.092 ms for a segmented sum of the gradients, 0.090 ms for the values'
gradient, against 0.38, 0.40 and 0.32 ms for `embedding_bag`); the elements and warps of a
program of `adam_rows_` (whole rows; --parts tail times a few); the rows and columns of a
`group_sums` program and its warps; the elements of a `row_topk` program (whole rows), its
warps, and whether its bisection stops early once a row has exactly k keys at or above the
midpoint (no faster on an H100: 1.830 against 1.825 ms for the recorded Scale e=2 step), and
whether 16-bit values' keys are 32-bit integers rather than 64-bit (`topk_narrow`); the
elements of a `top_experts` program (whole rows of router probabilities) and its warps; the
most (pair, expert) elements an `expert_plan` program holds for its block of pairs, and for all
blocks' counts, and its warps; the pairs, columns and warps of a `pack_rows` program; the
picks (whole rows of k) and warps of a `picks` program; the elements (rows of k picks, or of N
experts where wider) and warps of a `pick_grads` program; the
rows of a `squared_error` program, how many it reads at once, its columns and warps, and the
partial sums the one program adding them up reads at once (on an H100, the recorded Scale e=2
step took 1.764 ms with 256 rows 16 at a time, 1.772 with 64 rows, 1.859 with 32 rows 8 at a
time: `profile_gpu.py --parts fusions`, 2026-11-27); the elements of a `scaled_diff` program and
its warps."""


def _segment_sum_kernel(X, ix, w, offsets, bias, out, d, stride_x, stride_out, W, order, dots,
                        n_cb, scale, group_rows, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, BIAS: tl.constexpr, DOTS: tl.constexpr,
                        SCALED: tl.constexpr):
    """out[r, cols] = Σ_(p in [offsets[r], offsets[r + 1])) w[p] · X[ix[p], cols] (+ bias[cols]
    with BIAS, the sum started from it). With DOTS (segment r a feature's picks, X the decode's
    gradient), also each pick's partial dot product with W[r] over these columns from the same
    tiles: dots[order[p], column block] = Σ_cols X[ix[p], cols] · W[r, cols]. With SCALED (rows
    in groups of `group_rows`, row r in group i = r // group_rows): out[r, cols] = scale[i] · S +
    bias[i, cols] for the sum S above, and the row's partial dot product dots[r, column block] =
    Σ_cols S[cols] · W[r, cols]."""
    r = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(offsets + r)
    end = tl.load(offsets + r + 1)
    if BIAS:
        acc = tl.load(bias + cols, mask=cmask, other=0.0).to(ACC)
    else:
        acc = tl.zeros([BLOCK_D], dtype=ACC)
    if DOTS:
        w_row = tl.load(W + r.to(tl.int64) * d + cols, mask=cmask, other=0.0).to(ACC)
    if SCALED:
        w_row = tl.load(W + r.to(tl.int64) * d + cols, mask=cmask, other=0.0).to(ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        rows = tl.load(ix + p, mask=pmask, other=0).to(tl.int64)
        wts = tl.load(w + p, mask=pmask, other=0.0).to(ACC)
        tile = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                       mask=pmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(tile * wts[:, None], axis=0)
        if DOTS:
            at = tl.load(order + p, mask=pmask, other=0).to(tl.int64)
            tl.store(dots + at * n_cb + cb, tl.sum(tile * w_row[None, :], axis=1), mask=pmask)
    if SCALED:
        i = (r // group_rows).to(tl.int64)
        tl.store(dots + r.to(tl.int64) * n_cb + cb, tl.sum(acc * w_row, axis=0))
        acc = acc * tl.load(scale + i).to(ACC) + tl.load(bias + i * d + cols, mask=cmask,
                                                          other=0.0).to(ACC)
    tl.store(out + r.to(tl.int64) * stride_out + cols, acc.to(out.dtype.element_ty), mask=cmask)


def _picked_dots_kernel(G, W, idx, out, k, d, stride_g, stride_w,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[b, j] = Σ_c G[b, c] · W[idx[b, j], c] for the picks j of token b in this program's
    block of BLOCK_K of them."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = j < k
    rows = tl.load(idx + b * k + j, mask=jmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        gv = tl.load(G + b * stride_g + cols, mask=cmask, other=0.0).to(ACC)
        tile = tl.load(W + rows[:, None] * stride_w + cols[None, :],
                       mask=jmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(tile * gv[None, :], axis=1)
    tl.store(out + b * k + j, acc.to(out.dtype.element_ty), mask=jmask)


def _project_rows_kernel(G, W, R, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr):
    """G[r] −= ⟨G[r], W[r]⟩ · W[r] for each row r, in place."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < d)[None, :]
    at = rows.to(tl.int64)[:, None] * d + cols[None, :]
    g = tl.load(G + at, mask=mask, other=0.0).to(ACC)
    w = tl.load(W + at, mask=mask, other=0.0).to(ACC)
    dot = tl.sum(g * w, axis=1)
    tl.store(G + at, (g - dot[:, None] * w).to(G.dtype.element_ty), mask=mask)


def _unit_rows_kernel(W, R, d, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr):
    """W[r] /= max(‖W[r]‖, eps) for each row r, in place (a NaN norm stays NaN, as
    `clamp_min` leaves it)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < d)[None, :]
    at = rows.to(tl.int64)[:, None] * d + cols[None, :]
    w = tl.load(W + at, mask=mask, other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(w * w, axis=1))
    norm = tl.where(norm != norm, norm, tl.maximum(norm, eps))
    tl.store(W + at, (w / norm[:, None]).to(W.dtype.element_ty), mask=mask)


def _group_affine_kernel(X, s, c, out, R, m, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr):
    """out[r] = s[r // m] · X[r] + c[r // m] for rows r of X [R, d] in groups of m."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < d)[None, :]
    group = (rows // m).to(tl.int64)
    at = rows.to(tl.int64)[:, None] * d + cols[None, :]
    x = tl.load(X + at, mask=mask, other=0.0).to(ACC)
    sg = tl.load(s + group, mask=rmask, other=0.0).to(ACC)
    cg = tl.load(c + group[:, None] * d + cols[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(out + at, (sg[:, None] * x + cg).to(out.dtype.element_ty), mask=mask)


def _projected_sq_kernel(G, W, out, R, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr):
    """out[r] = ‖G[r] − ⟨G[r], W[r]⟩ · W[r]‖² for each row r: the squared norm of the row's
    projected gradient, which is not written anywhere."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < d)[None, :]
    at = rows.to(tl.int64)[:, None] * d + cols[None, :]
    g = tl.load(G + at, mask=mask, other=0.0).to(ACC)
    w = tl.load(W + at, mask=mask, other=0.0).to(ACC)
    r = g - tl.sum(g * w, axis=1)[:, None] * w
    tl.store(out + rows, tl.sum(r * r, axis=1).to(out.dtype.element_ty), mask=rmask)


def _adam_rows_kernel(W, G, M1, M2, lr, step, scale, R, d, beta1, beta2, rest1, rest2,
                      log_beta1, log_beta2, eps, unit_eps, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr, DECODER: tl.constexpr):
    """A weight's whole optimiser step, in place, for each row r (float32 rows); with DECODER
    the decoder's, its gradient projected first and its rows put back to unit norm after:
        g = (G[r] − ⟨G[r], W[r]⟩ · W[r]) / scale      the gradient projected (DECODER), clipped
        M1[r] = β1 · M1[r] + (1 − β1) · g;  M2[r] = β2 · M2[r] + (1 − β2) · g²
        W[r] −= lr / (1 − β1ᵗ) · M1[r] / (√M2[r] / √(1 − β2ᵗ) + eps)      (Adam, as torch's)
        W[r] /= max(‖W[r]‖, unit_eps)                                   (DECODER: unit norm)
    with t the step count already incremented on the device and the bias corrections in
    float64, as torch's fused Adam takes them; rest1, rest2 are 1 − β1 and 1 − β2 rounded
    once from double precision (1 − β2 computed in float32 from β2 = 0.999 is 1.3e-5 off)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < d)[None, :]
    at = rows.to(tl.int64)[:, None] * d + cols[None, :]
    t = tl.load(step).to(tl.float64)
    bc1 = 1.0 - tl.exp(t * tl.cast(log_beta1, tl.float64))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(t * tl.cast(log_beta2, tl.float64)))
    step_size = (tl.load(lr).to(tl.float64) / bc1).to(tl.float32)
    bc2_sqrt = bc2_sqrt.to(tl.float32)
    g = tl.load(G + at, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + at, mask=mask, other=0.0).to(tl.float32)
    if DECODER:
        g = g - tl.sum(g * w, axis=1)[:, None] * w
    g = g / tl.load(scale).to(tl.float32)
    m1 = beta1 * tl.load(M1 + at, mask=mask, other=0.0) + rest1 * g
    m2 = beta2 * tl.load(M2 + at, mask=mask, other=0.0) + rest2 * g * g
    w = w - step_size * m1 / (tl.sqrt(m2) / bc2_sqrt + eps)
    if DECODER:
        norm = tl.sqrt(tl.sum(w * w, axis=1))
        norm = tl.where(norm != norm, norm, tl.maximum(norm, unit_eps))
        w = w / norm[:, None]
    tl.store(W + at, w, mask=mask)
    tl.store(M1 + at, m1, mask=mask)
    tl.store(M2 + at, m2, mask=mask)


def _expert_rows_kernel(Y, dest, order, expert, b, scale, offset, out, P, m, stride_y,
                        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, SCALED: tl.constexpr):
    """out[order[p]] = Y[dest[p]] + b[expert[p]] for each sorted pair p: the bias added in
    float32 and rounded once to out's dtype (the grouped GEMM's epilogue, back in pair order).
    With SCALED, Feature Scaling folded in: scale[expert[p]] · Y[dest[p]] + offset[order[p]] +
    b[expert[p]], all in float32."""
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_M)
    pmask = p < P
    mask = pmask[:, None] & (cols < m)[None, :]
    src = tl.load(dest + p, mask=pmask, other=0).to(tl.int64)
    to = tl.load(order + p, mask=pmask, other=0).to(tl.int64)
    ex = tl.load(expert + p, mask=pmask, other=0).to(tl.int64)
    y = tl.load(Y + src[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(b + ex[:, None] * m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        s = tl.load(scale + ex, mask=pmask, other=0.0).to(tl.float32)
        off = tl.load(offset + to, mask=pmask, other=0.0).to(tl.float32)
        y = y * s[:, None] + off[:, None]
    tl.store(out + to[:, None] * m + cols[None, :], (y + bias).to(out.dtype.element_ty), mask=mask)


def _group_sums_kernel(G, W, colsum, dots, m, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr):
    """For expert i = program 0, its rows in block program 1 and columns in block program 2:
    colsum[i, block, cols] = Σ_rows G[i, row, cols] and dots[i, block, col block] =
    Σ_rows Σ_cols G[i, row, col] · W[i, row, col] — partial sums, added up by the caller."""
    i = tl.program_id(0).to(tl.int64)
    rb, cb = tl.program_id(1), tl.program_id(2)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    mask = (rows < m)[:, None] & cmask[None, :]
    at = (i * m + rows.to(tl.int64))[:, None] * d + cols[None, :]
    g = tl.load(G + at, mask=mask, other=0.0).to(ACC)
    w = tl.load(W + at, mask=mask, other=0.0).to(ACC)
    blocks_r = tl.num_programs(1)
    tl.store(colsum + (i * blocks_r + rb) * d + cols, tl.sum(g, axis=0), mask=cmask)
    tl.store(dots + (i * blocks_r + rb) * tl.num_programs(2) + cb, tl.sum(tl.sum(g * w, axis=1), axis=0))


def _row_topk_kernel(F, vals, pos, R, n, k, stride_f, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, BITS: tl.constexpr, INF: tl.constexpr,
                     EARLY: tl.constexpr, KEY64: tl.constexpr):
    """The k largest of each row of F [R, n] (unsorted) and their positions, with whole rows
    held by the program: each value becomes an integer key in the same order (its bits, the
    negative ones' magnitude bits flipped; NaN above every number, as torch.topk has it), a
    bisection finds the k-th largest key t (with EARLY, it stops once every row of the program
    has exactly k keys at or above its midpoint), and the keys above t and the first ties at t
    are written out in column order (their output slots from a running count). The keys are
    64-bit integers with KEY64 (a 32-bit value's key needs 33 bits), else 32-bit (16-bit
    values: half the registers, and comparisons of one instruction)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < R
    mask = rmask[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(F + rows64[:, None] * stride_f + cols[None, :], mask=mask, other=0.0)
    if BITS == 16:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        mag = b & 0x7FFF
    else:
        b = x.to(tl.int32, bitcast=True)
        mag = b & 0x7FFFFFFF
    key = tl.where(b >= 0, b, b ^ ((1 << (BITS - 1)) - 1))
    if KEY64:
        key = key.to(tl.int64)
    top = key * 0 + (1 << (BITS - 1))  # one above the largest key of a number
    key = tl.where(mag > INF, top, key)  # NaN: magnitude bits above infinity's
    key = tl.where(mask, key, -top - 1)  # padding: below every key, never counted
    lo = tl.min(tl.where(mask, key, top), axis=1)
    hi = tl.max(key, axis=1)
    busy = tl.max(hi - lo, axis=0) > 0
    while busy:  # t: the largest with at least k keys ≥ t, or any t with exactly k keys ≥ t
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1)
        ok = count >= k
        lo = tl.where(ok, mid, lo)
        if EARLY:  # exactly k keys ≥ mid: they are the k largest, whatever lies between
            hi = tl.where(count == k, mid, tl.where(ok, hi, mid - 1))
        else:
            hi = tl.where(ok, hi, mid - 1)
        busy = tl.max(hi - lo, axis=0) > 0
    above = key > lo[:, None]
    ties = key == lo[:, None]
    room = k - tl.sum(above.to(tl.int32), axis=1)
    take = above | (ties & (tl.cumsum(ties.to(tl.int32), axis=1) <= room[:, None]))
    at = rows64[:, None] * k + (tl.cumsum(take.to(tl.int32), axis=1) - 1)
    tl.store(vals + at, x, mask=take)
    tl.store(pos + at, (cols[None, :] + rows64[:, None] * 0), mask=take)


def _top_experts_kernel(P, out, R, n, e, stride_p, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r, j] = the column of row r of P [R, n] (probabilities: ≥ 0, or NaN) with the j-th
    largest value, j < e, largest first (NaN above every number, as torch.topk; equal values
    lowest column first): e passes of an argmax over the row the program holds, each taken
    column set below every probability for the next (and the padding below those)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < R
    mask = rmask[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)
    v = tl.load(P + rows64[:, None] * stride_p + cols[None, :], mask=mask, other=-2.0).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)
    for j in range(e):
        top = tl.argmax(v, axis=1)
        tl.store(out + rows64 * e + j, top.to(tl.int64), mask=rmask)
        v = tl.where(cols[None, :] == top[:, None], -1.0, v)


def _expert_counts_kernel(E, counts, P, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """counts[b, i] = how many of the pairs in block b (BLOCK of them) name expert i."""
    b = tl.program_id(0)
    q = b * BLOCK + tl.arange(0, BLOCK)
    ex = tl.load(E + q, mask=q < P, other=-1)
    hit = ex[:, None] == tl.arange(0, BLOCK_N)[None, :]
    tl.store(counts + b * BLOCK_N + tl.arange(0, BLOCK_N), tl.sum(hit.to(tl.int32), axis=0))


def _expert_dest_kernel(E, counts, dest, ends, P, NB, align, BLOCK: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """For the pairs of block b: dest[q] = the row of pair q in the grouped GEMM's buffer,
    whose expert groups start at multiples of `align` rows, each group's pairs in pair order
    (a stable counting sort): its expert's group start + that expert's pairs in earlier blocks
    (from all blocks' `counts`) + those before q in this block. Program 0 also writes
    ends[i] = one past expert i's padded group (int32, the grouped GEMM's offsets)."""
    b = tl.program_id(0)
    blocks = tl.arange(0, BLOCK_B)
    experts = tl.arange(0, BLOCK_N)
    part = tl.load(counts + blocks[:, None] * BLOCK_N + experts[None, :],
                   mask=(blocks < NB)[:, None], other=0)
    padded = (tl.sum(part, axis=0) + align - 1) // align * align
    end = tl.cumsum(padded, axis=0)
    base = end - padded + tl.sum(tl.where((blocks < b)[:, None], part, 0), axis=0)
    if b == 0:
        tl.store(ends + experts, end.to(tl.int32))
    q = b * BLOCK + tl.arange(0, BLOCK)
    qmask = q < P
    ex = tl.load(E + q, mask=qmask, other=-1)
    hit = (ex[:, None] == experts[None, :]).to(tl.int32)
    seen = tl.cumsum(hit, axis=0)  # this block's pairs of each expert up to q, q included
    at = tl.sum(hit * (base[None, :] + seen - 1), axis=1)
    tl.store(dest + q, at.to(tl.int64), mask=qmask)


def _pack_rows_kernel(X, tokens, dest, out, P, d, stride_x, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """out[dest[q], cols] = X[tokens[q], cols] for the pairs q of this program's block."""
    q = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    qmask = q < P
    mask = qmask[:, None] & (cols < d)[None, :]
    src = tl.load(tokens + q, mask=qmask, other=0).to(tl.int64)
    to = tl.load(dest + q, mask=qmask, other=0).to(tl.int64)
    v = tl.load(X + src[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    tl.store(out + to[:, None] * d + cols[None, :], v, mask=mask)


def _centred_rows_kernel(X, c, out, R, d, stride_x, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = X[r] − c for whole rows r, computed in float32 and rounded once to out's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < d)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cv = tl.load(c + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(out + rows64[:, None] * d + cols[None, :], (x - cv[None, :]).to(out.dtype.element_ty),
             mask=mask)


def _picks_kernel(pos, top, pre, experts, idx, slot, z, vals, R, k, e, m, stride_pre,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ROUTED: tl.constexpr):
    """For each token r's TopK picks j (candidate positions pos[r, j], weighted values
    top[r, j]): vals = ReLU(top) and z = ReLU(pre[r, pos]) in vals' and z's dtypes, and the
    pick's feature idx — with ROUTED, candidate p is row p % m of the token's expert
    experts[r, p // m] (its slot p // m written too), else feature p."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (j < k)[None, :]
    rows64 = rows.to(tl.int64)
    at = rows64[:, None] * k + j[None, :]
    p = tl.load(pos + at, mask=mask, other=0).to(tl.int64)
    t = tl.load(top + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pre + rows64[:, None] * stride_pre + p, mask=mask, other=0.0).to(tl.float32)
    if ROUTED:
        s = p // m
        ex = tl.load(experts + rows64[:, None] * e + s, mask=mask, other=0).to(tl.int64)
        tl.store(slot + at, s, mask=mask)
        f = ex * m + (p - s * m)
    else:
        f = p
    tl.store(idx + at, f, mask=mask)
    tl.store(z + at, tl.maximum(u, 0.0).to(z.dtype.element_ty), mask=mask)
    tl.store(vals + at, tl.maximum(t, 0.0).to(vals.dtype.element_ty), mask=mask)


def _pick_grads_kernel(g, z, slot, wts, experts, g_pre, grad_w, per_expert, R, k, e, N,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       PER_EXPERT: tl.constexpr):
    """For each token r's picks j from expert slot slot[r, j] (weight wts[r, slot], value
    before weighting z[r, j] ≥ 0, gradient g[r, j]): g_pre = g · w where z > 0, else 0;
    grad_w[r, s] = Σ over the slot's picks of g · z; with PER_EXPERT, per_expert[r, i] = Σ of
    g_pre over the picks of the slot whose expert is i (0 for the experts the token skips)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_K)
    rmask = rows < R
    mask = rmask[:, None] & (j < k)[None, :]
    rows64 = rows.to(tl.int64)
    at = rows64[:, None] * k + j[None, :]
    gv = tl.load(g + at, mask=mask, other=0.0).to(tl.float32)
    zv = tl.load(z + at, mask=mask, other=0.0).to(tl.float32)
    sl = tl.load(slot + at, mask=mask, other=0)
    w = tl.load(wts + rows64[:, None] * e + sl, mask=mask, other=0.0).to(tl.float32)
    gp = tl.where(zv > 0, gv * w, 0.0)
    tl.store(g_pre + at, gp, mask=mask)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for s in range(e):
        mine = sl == s
        tl.store(grad_w + rows64 * e + s,
                 tl.sum(tl.where(mine, gv * zv, 0.0), axis=1).to(grad_w.dtype.element_ty), mask=rmask)
        if PER_EXPERT:
            ex = tl.load(experts + rows64 * e + s, mask=rmask, other=-1)
            acc += tl.where(cols[None, :] == ex[:, None],
                            tl.sum(tl.where(mine, gp, 0.0), axis=1)[:, None], 0.0)
    if PER_EXPERT:
        tl.store(per_expert + rows64[:, None] * N + cols[None, :], acc,
                 mask=rmask[:, None] & (cols < N)[None, :])


def _squared_error_kernel(A, Bt, sse, sq, colsum, R, d, ROWS: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial sums over ROWS rows from block program 0 (BLOCK_R at a time) and the columns in
    block program 1 of A and Bt [R, d], in float64: sse[part] = Σ (A − Bt)², sq[part] = Σ Bt²,
    colsum[row block, cols] = Σ_rows Bt."""
    rb, cb = tl.program_id(0), tl.program_id(1)
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    acc_sse = tl.zeros([BLOCK_D], dtype=tl.float64)
    acc_sq = tl.zeros([BLOCK_D], dtype=tl.float64)
    acc_col = tl.zeros([BLOCK_D], dtype=tl.float64)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = rb * ROWS + r0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & cmask[None, :]
        at = rows.to(tl.int64)[:, None] * d + cols[None, :]
        a = tl.load(A + at, mask=mask, other=0.0).to(tl.float64)
        b = tl.load(Bt + at, mask=mask, other=0.0).to(tl.float64)
        diff = a - b
        acc_sse += tl.sum(diff * diff, axis=0)
        acc_sq += tl.sum(b * b, axis=0)
        acc_col += tl.sum(b, axis=0)
    part = rb * tl.num_programs(1) + cb
    tl.store(sse + part, tl.sum(acc_sse, axis=0))
    tl.store(sq + part, tl.sum(acc_sq, axis=0))
    tl.store(colsum + rb.to(tl.int64) * d + cols, acc_col, mask=cmask)


def _squared_error_total_kernel(sse, sq, colsum, out, parts, blocks, d, R, BLOCK: tl.constexpr,
                                BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: out[0] = Σ sse (the squared error), out[1] = Σ sq − ‖Σ_blocks colsum‖² / R
    (the spread about the mean), from `_squared_error_kernel`'s partial sums; the column sums
    read in [BLOCK_B, BLOCK_C] tiles."""
    at = tl.arange(0, BLOCK)
    total_sse = tl.zeros([BLOCK], dtype=tl.float64)
    total_sq = tl.zeros([BLOCK], dtype=tl.float64)
    for p0 in range(0, parts, BLOCK):
        m = p0 + at < parts
        total_sse += tl.load(sse + p0 + at, mask=m, other=0.0)
        total_sq += tl.load(sq + p0 + at, mask=m, other=0.0)
    bs = tl.arange(0, BLOCK_B)
    cs = tl.arange(0, BLOCK_C)
    mean_sq = tl.zeros([BLOCK_C], dtype=tl.float64)
    for c0 in range(0, d, BLOCK_C):
        cm = c0 + cs < d
        col = tl.zeros([BLOCK_C], dtype=tl.float64)
        for b0 in range(0, blocks, BLOCK_B):
            rows = b0 + bs
            tile = tl.load(colsum + rows.to(tl.int64)[:, None] * d + (c0 + cs)[None, :],
                           mask=(rows < blocks)[:, None] & cm[None, :], other=0.0)
            col += tl.sum(tile, axis=0)
        mean_sq += col * col
    tl.store(out, tl.sum(total_sse, axis=0).to(tl.float32))
    spread = tl.sum(total_sq, axis=0) - tl.sum(mean_sq, axis=0) / R
    tl.store(out + 1, spread.to(tl.float32))


def _scaled_diff_kernel(A, Bt, g, out, n, BLOCK: tl.constexpr):
    """out = (A − Bt) · 2g elementwise, g a one-element tensor (the squared error's gradient)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    s = 2 * tl.load(g).to(tl.float32)
    a = tl.load(A + i, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bt + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + i, ((a - b) * s).to(out.dtype.element_ty), mask=mask)


@functools.cache
def _compiled():
    """The kernels by name, through `triton.jit`: compiled for the GPU, or run by Triton's
    interpreter on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported
    (tests/conftest.py does so on machines without CUDA)."""
    return {fn.__name__.strip("_").removesuffix("_kernel"): triton.jit(fn)
            for fn in (_segment_sum_kernel, _picked_dots_kernel, _project_rows_kernel,
                       _unit_rows_kernel, _group_affine_kernel, _projected_sq_kernel,
                       _adam_rows_kernel, _expert_rows_kernel, _group_sums_kernel,
                       _row_topk_kernel, _squared_error_kernel, _squared_error_total_kernel,
                       _scaled_diff_kernel, _top_experts_kernel, _expert_counts_kernel,
                       _expert_dest_kernel, _pack_rows_kernel, _centred_rows_kernel,
                       _picks_kernel, _pick_grads_kernel)}


def available(device: torch.device) -> bool:
    """True where these kernels run compiled: a CUDA device Triton compiles for (compute
    capability 7.0 or later) and an importable triton."""
    return triton is not None and device.type == "cuda" and _capable(device.index)


@functools.cache
def _capable(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (7, 0)


ENABLED: dict[str, bool] = {"cuda": os.environ.get("MOESAE_TRITON", "1") != "0"}
"""Device types whose steps use these kernels where they can run (`use`); `MOESAE_TRITON=0`
in the environment turns them off on CUDA. The CPU keeps its PyTorch forms (the tests run the
kernels there through Triton's interpreter); on an H100 see `benchmarks/profile_gpu.py --parts
kernels,decoder`."""


def use(t: Tensor) -> bool:
    """Whether work on t's device goes through these kernels: enabled for its device type, and
    runnable (compiled on CUDA once `works` there, or interpreted)."""
    if not ENABLED.get(t.device.type, False):
        return False
    if interpreted():
        return True
    return available(t.device) and works(t.device)


def works(device: torch.device) -> bool:
    """Whether the kernels compile and give the right answer on this CUDA device (a tensor's
    device, so its index is set): tried once per device on a tiny case against PyTorch. Where
    they do not (a GPU or driver Triton cannot compile for), one warning line says so and the
    engine keeps PyTorch's forms."""
    return _tried(_WORKS, device, _try)


def adam_works(device: torch.device) -> bool:
    """Whether `adam_rows_` compiles and matches PyTorch on this device (tried once per
    device, like `works`; it alone computes in float64, which a GPU compiler might refuse):
    where it does not, one warning line, and the optimiser keeps PyTorch's passes."""
    if interpreted() and device.type == "cpu":
        return True
    return _tried(_ADAM_WORKS, device, _try_adam)


def use_fused(t: Tensor) -> bool:
    """`use`, and this round's fused passes (`scaled_segment_sum`, `top_experts`, `expert_plan`,
    `pack_rows`, `centred_rows`, `picks`, `pick_grads`) passed their own first try on t's device
    (`_check_fused`): where one of them does not compile, the kernels before them still run."""
    if not use(t):
        return False
    return interpreted() or _tried(_FUSED_WORKS, t.device, _try_fused)


_FUSED_WORKS: dict[torch.device, bool] = {}
_WORKS: dict[torch.device, bool] = {}
_ADAM_WORKS: dict[torch.device, bool] = {}


def _tried(verdicts: dict, device: torch.device, trial) -> bool:
    """`trial(device)` once per device, its verdict kept in `verdicts`. Inside a CUDA graph's
    recording, which cannot wait for a result, a device not yet tried counts as working (the
    trainer's eager warm-up steps have tried it by then)."""
    if device not in verdicts:
        if torch.cuda.is_current_stream_capturing():
            return True
        verdicts[device] = trial(device)
    return verdicts[device]


def _verdict(device: torch.device, check, fallback: str) -> bool:
    """True if `check(device)` runs and returns True; otherwise one warning line, "<what> do
    not run on <device> (<why>); <fallback>", and False."""
    import warnings

    try:
        if not check(device):
            raise RuntimeError("they gave other numbers than PyTorch on a tiny case")
        return True
    except Exception as exc:  # any failure to compile or run: PyTorch's forms instead
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(fallback.format(device=device, why=why), RuntimeWarning, stacklevel=4)
        return False


def _try(device: torch.device) -> bool:
    return _verdict(device, _check_kernels, "The Triton kernels do not run on {device} ({why}); "
                    "training uses PyTorch's kernels there, which are slower.")


def _try_fused(device: torch.device) -> bool:
    return _verdict(device, _check_fused, "This round's fused Triton passes do not run on {device} "
                    "({why}); training keeps the other Triton kernels and PyTorch's forms of these.")


def _try_adam(device: torch.device) -> bool:
    return _verdict(device, _check_adam, "The fused optimiser passes do not run on {device} "
                    "({why}); the optimiser keeps PyTorch's passes there, which are slower.")


def _tiny_case(device: torch.device):
    """The first tries' case: (X [5, 3], rows ix, weights w, offsets of three segments — one
    empty — and their weighted sums by `embedding_bag`)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(5, 3, generator=gen).to(device)
    ix = torch.tensor([0, 4, 2, 2, 1], device=device)
    w = torch.tensor([1.0, -2.0, 0.5, 0.25, 3.0], device=device)
    offsets = torch.tensor([0, 2, 2, 5], device=device)
    want = torch.nn.functional.embedding_bag(ix, X, offsets[:-1], mode="sum", per_sample_weights=w)
    return X, ix, w, offsets, want


def _check_kernels(device: torch.device) -> bool:
    X, ix, w, offsets, want = _tiny_case(device)
    dots = (X[:2, None, :] * X[ix.view(1, 5)]).sum(-1)
    top, at = row_topk(X.T.contiguous(), 2)
    sums = group_sums(X.view(1, 5, 3), X.view(1, 5, 3))
    # both decoder gradients of a decode of 2 tokens × 2 picks, picks sorted by feature (row)
    chosen = torch.tensor([[0, 4], [2, 0]], device=device)
    acts = torch.tensor([[1.0, -2.0], [0.5, 3.0]], device=device)
    order = torch.tensor([0, 3, 2, 1], device=device)  # features 0, 0, 2, 4
    grad_acts, grad_W = decoder_grads(X[:2], X, acts, order // 2, order,
                                      torch.tensor([0, 2, 2, 3, 3, 4], device=device))
    sse, spread = squared_error(X, X.flip(0))
    return (torch.allclose(segment_sum(X, ix, w, offsets), want, atol=1e-5)
            and torch.allclose(grad_acts, (X[:2, None, :] * X[chosen]).sum(-1), atol=1e-5)
            and torch.allclose(grad_W, torch.zeros_like(X).index_add_(
                0, chosen.reshape(-1), (acts[:, :, None] * X[:2, None, :]).reshape(-1, 3)),
                atol=1e-5)
            and torch.allclose(sse, (X - X.flip(0)).square().sum(), atol=1e-4)
            and torch.allclose(spread, (X.flip(0) - X.mean(0)).square().sum(), atol=1e-4)
            and torch.allclose(scaled_diff(X, X.flip(0), torch.ones((), device=device)),
                               2 * (X - X.flip(0)), atol=1e-6)
            and torch.allclose(picked_dots(X[:2], X, ix.view(1, 5).expand(2, 5)), dots, atol=1e-5)
            and torch.allclose(unit_rows_(X.clone()).norm(dim=1), torch.ones(5, device=device), atol=1e-5)
            and torch.equal(top.sort(1).values, X.T.topk(2).values.sort(1).values)
            and torch.equal(X.T.gather(1, at), top)
            and torch.allclose(sums[0].view(3), X.sum(0), atol=1e-5)
            and torch.allclose(sums[1], X.pow(2).sum().view(1), atol=1e-5))


def _check_fused(device: torch.device) -> bool:
    """The fused passes of 2026-11-27's second round (`use_fused`) against their PyTorch forms
    on tiny cases."""
    X, ix, w, offsets, want = _tiny_case(device)
    scaled, row_dots = scaled_segment_sum(X, ix, w, offsets, torch.full((1,), 2.0, device=device),
                                          X[:1], X[:3])
    # one token's 5 picks (gradients w) in slots 0, 0, 0, 0, 1 of its experts 0 and 4
    slots, weights = (ix % 2).view(1, 5), torch.tensor([[0.25, 0.75]], device=device)
    per_expert = pick_grads(w.view(1, 5), w.abs().view(1, 5), slots, weights, ix[None, :2], 5)[2]
    want_per = torch.tensor([[0.25 * float(w[:4].sum()), 0, 0, 0, 0.75 * float(w[4])]],
                            device=device)
    dest, ends = expert_plan(ix, 5, 2)  # pairs naming experts 0, 4, 2, 2, 1
    packed = pack_rows(X, ix, dest, torch.zeros(9, 3, device=device))
    return (dest.tolist() == [0, 6, 4, 5, 2] and ends.tolist() == [2, 4, 6, 6, 8]
            and torch.equal(packed[dest], X[ix])
            and torch.equal(top_experts(X.T.softmax(1).contiguous(), 2), X.T.topk(2).indices)
            and torch.allclose(scaled, 2 * want + X[:1], atol=1e-5)
            and torch.allclose(row_dots, (want * X[:3]).sum(1), atol=1e-5)
            and torch.allclose(per_expert, want_per, atol=1e-5)
            and picks(ix.view(1, 5), w.view(1, 5), X.T.reshape(1, 15), ix.view(1, 5), 3,
                      torch.float32)[0].tolist() == [[0, 13, 2, 2, 1]]
            and torch.allclose(centred_rows(X, X[0], torch.bfloat16).float(), X - X[0],
                               rtol=2**-7, atol=1e-6))


def _check_adam(device: torch.device) -> bool:
    """Both forms of `adam_rows_` against the formulas, one step from given moments."""
    gen = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(3, 5, generator=gen), dim=1).to(device)
    G = torch.randn(3, 5, generator=gen).to(device)
    m1, m2 = torch.full_like(W, 0.1), torch.full_like(W, 0.2)
    step, scale = torch.full((), 2.0, device=device), torch.full((), 2.0, device=device)
    g = (G - (G * W).sum(1, keepdim=True) * W) / 2
    w1, w2 = 0.9 * m1 + 0.1 * g, 0.999 * m2 + 0.001 * g * g
    want = W - 0.1 / (1 - 0.9**2) * w1 / (w2.sqrt() / (1 - 0.999**2) ** 0.5 + 1e-8)
    want = want / want.norm(dim=1, keepdim=True)
    plain = W - 0.1 / (1 - 0.9**2) * (0.9 * m1 + 0.05 * G) / (
        (0.999 * m2 + 0.00025 * G * G).sqrt() / (1 - 0.999**2) ** 0.5 + 1e-8)
    got_plain = adam_rows_(W.clone(), G, m1.clone(), m2.clone(), 0.1, step, scale, (0.9, 0.999),
                           1e-8, decoder=False)
    got = adam_rows_(W.clone(), G, m1, m2, 0.1, step, scale, (0.9, 0.999), 1e-8, decoder=True)
    return (torch.allclose(got, want, atol=1e-5) and torch.allclose(m2, w2, atol=1e-6)
            and torch.allclose(got_plain, plain, atol=1e-5))


def interpreted() -> bool:
    """True where the kernels run on CPU tensors, through Triton's interpreter."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(t: Tensor):
    if not (available(t.device) or interpreted()):
        raise RuntimeError(f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1), not {t.device}")
    return _compiled()


def _acc(*ts: Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in ts) else tl.float32


def _warps(key: str) -> dict:
    """The launch's warps from `BLOCKS[key]` (the interpreter takes none)."""
    return {} if interpreted() else {"num_warps": BLOCKS[key]}


def segment_sum(X: Tensor, ix: Tensor, w: Tensor, offsets: Tensor,
                out_dtype: torch.dtype = torch.float32, bias: Tensor | None = None) -> Tensor:
    """[R, d]: row r is Σ w[p] · X[ix[p]] over p in [offsets[r], offsets[r + 1]) — what
    `embedding_bag(ix, X, offsets[:-1], mode="sum", per_sample_weights=w)` computes, with R + 1
    offsets (the last one the number of picks); with `bias` [d], each row's sum starts from it
    (the decode's + b_dec, without a pass of its own)."""
    seg = _kernels(X)["segment_sum"]
    X = X.contiguous()
    R, d = offsets.numel() - 1, X.shape[1]
    out = torch.empty(R, d, dtype=out_dtype, device=X.device)
    if R == 0 or d == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(R, d))
    bd = min(BLOCKS["segment_d"], triton.next_power_of_2(d))
    grid = (R, triton.cdiv(d, bd))
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else w  # not read without BIAS
    seg[grid](X, ix.contiguous(), w.contiguous(), offsets.contiguous(), bias, out, d, X.stride(0),
              out.stride(0), w, ix, w, 1, w, 1, BLOCK_P=BLOCKS["segment_p"], BLOCK_D=bd,
              ACC=_acc(X, w), BIAS=has_bias, DOTS=False, SCALED=False, **_warps("segment_warps"))
    return out


def scaled_segment_sum(X: Tensor, ix: Tensor, w: Tensor, offsets: Tensor, scale: Tensor,
                       init: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """`segment_sum`'s sums S[r] with each row's group i (the R rows in G = len(scale) groups of
    R / G) scaled and shifted, and each row's dot product with W's: (out [R, d] float32 with
    out[r] = scale[i] · S[r] + init[i], dots [R] float32 with dots[r] = ⟨S[r], W[r]⟩), from one
    pass. Feature Scaling's encoder gradient with its scale folded in: S the gradient of Ŵ's
    rows, out W's (the means' share as `init`), and the dots summed per expert the scale's."""
    seg = _kernels(X)["segment_sum"]
    X, W = X.contiguous(), W.contiguous()
    R, d = offsets.numel() - 1, X.shape[1]
    groups = scale.numel()
    if W.shape != (R, d) or init.shape != (groups, d) or groups == 0 or R % groups:
        raise ValueError("scaled_segment_sum takes W [R, d], scale [G] and init [G, d] with G "
                         "dividing R")
    bd = min(BLOCKS["segment_d"], triton.next_power_of_2(max(d, 1)))
    n_cb = triton.cdiv(d, bd)
    out = torch.empty(R, d, dtype=torch.float32, device=X.device)
    dots = torch.zeros(R, n_cb, dtype=torch.float32, device=X.device)
    if R and d:
        seg[(R, n_cb)](X, ix.contiguous(), w.contiguous(), offsets.contiguous(),
                       init.contiguous(), out, d, X.stride(0), d, W, ix, dots, n_cb,
                       scale.contiguous(), R // groups, BLOCK_P=BLOCKS["segment_p"], BLOCK_D=bd,
                       ACC=_acc(X, w, W), BIAS=False, DOTS=False, SCALED=True,
                       **_warps("segment_warps"))
    elif R:  # no columns, or no picks to walk
        out.copy_(init.float().repeat_interleave(R // groups, 0))
    return out, dots.sum(1)


def decoder_grads(G: Tensor, W: Tensor, acts: Tensor, tokens: Tensor, order: Tensor,
                  offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Both gradients of the sparse decode x̂[b] = Σ_j acts[b, j] · W[idx[b, j]] from one pass
    over the picks sorted by feature (`moe._feature_groups`: sorted pick p is pick order[p] of
    idx.reshape(-1), of token tokens[p]; feature f's picks are offsets[f] to offsets[f + 1]):
    (∂acts [B, k] = ⟨G[b], W[idx[b, j]]⟩, ∂W [M, d] = Σ over f's picks of acts · G[b]), float32.
    Each gathered row of G is read once for both — where `picked_dots` and `segment_sum` read
    it once each — the dot products summed from one partial per block of columns."""
    fn = _kernels(G)["segment_sum"]
    B, k = acts.shape
    G, W = G.contiguous(), W.contiguous()
    M, d = W.shape
    bd = min(BLOCKS["segment_d"], triton.next_power_of_2(max(d, 1)))
    n_cb = triton.cdiv(d, bd)
    out = torch.empty(M, d, dtype=torch.float32, device=G.device)
    dots = torch.zeros(B * k, n_cb, dtype=torch.float32, device=G.device)
    if M and d:
        w = acts.reshape(-1)[order].contiguous()
        fn[(M, n_cb)](G, tokens.contiguous(), w, offsets.contiguous(), w, out, d, G.stride(0), d,
                      W, order.contiguous(), dots, n_cb, w, 1, BLOCK_P=BLOCKS["segment_p"],
                      BLOCK_D=bd, ACC=_acc(G, W), BIAS=False, DOTS=True, SCALED=False,
                      **_warps("segment_warps"))
    else:
        out.zero_()
    return dots.sum(1).view(B, k), out


def picked_dots(G: Tensor, W: Tensor, idx: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, k]: ⟨G[b], W[idx[b, j]]⟩ for each pick (a sampled dense-dense product)."""
    dots = _kernels(G)["picked_dots"]
    B, k = idx.shape
    G, W = G.contiguous(), W.contiguous()
    out = torch.empty(B, k, dtype=out_dtype, device=G.device)
    if B == 0 or k == 0:
        return out
    if W.shape[1] == 0:
        return out.zero_()
    bd = min(BLOCKS["dots_d"], triton.next_power_of_2(W.shape[1]))
    bk = min(BLOCKS["dots_k"], triton.next_power_of_2(k))  # AuxK's k_aux reaches d/2 picks
    dots[(B, triton.cdiv(k, bk))](G, W, idx.contiguous(), out, k, W.shape[1], G.stride(0),
                                  W.stride(0), BLOCK_K=bk, BLOCK_D=bd, ACC=_acc(G, W),
                                  **_warps("dots_warps"))
    return out


def _row_tiles(d: int, elems: str = "row_elems", warps: str = "row_warps") -> tuple[int, int, dict]:
    """Whole rows a program: (rows a program, columns padded to a power of two, launch options)
    from the `BLOCKS` entries named `elems` (elements a program holds) and `warps`."""
    bd = triton.next_power_of_2(max(d, 1))
    return max(1, BLOCKS[elems] // bd), bd, _warps(warps)


def _rows_in_place(t: Tensor) -> None:
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError("the row kernels work in place on contiguous [R, d] tensors")


def project_rows_(G: Tensor, W: Tensor) -> Tensor:
    """G[r] −= ⟨G[r], W[r]⟩ · W[r] in place (G, W contiguous [R, d]): the decoder gradient's
    component along each (unit) decoder row removed, in one pass over both. Like an in-place
    PyTorch op it counts as a change of G for autograd."""
    fn = _kernels(G)["project_rows"]
    _rows_in_place(G)
    R, d = G.shape
    br, bd, extra = _row_tiles(d)
    if R:
        fn[(triton.cdiv(R, br),)](G, W.contiguous(), R, d, BLOCK_R=br, BLOCK_D=bd,
                                  ACC=_acc(G, W), **extra)
    torch.autograd.graph.increment_version(G)
    return G


def unit_rows_(W: Tensor, eps: float = 1e-8) -> Tensor:
    """W[r] /= max(‖W[r]‖, eps) in place (W contiguous [R, d]), in one pass; counted as a
    change of W for autograd (and for `SparseAutoencoder.fingerprint`)."""
    fn = _kernels(W)["unit_rows"]
    _rows_in_place(W)
    R, d = W.shape
    br, bd, extra = _row_tiles(d)
    if R:
        fn[(triton.cdiv(R, br),)](W, R, d, eps, BLOCK_R=br, BLOCK_D=bd, ACC=_acc(W), **extra)
    torch.autograd.graph.increment_version(W)
    return W


def group_affine(X: Tensor, s: Tensor, c: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """[N, m, d]: s[i] · X[i, j] + c[i] for X [N, m, d], s [N], c [N, d] — Feature Scaling's
    Ŵ_i = s_i · W_i + c_i and its gradient's s_i · G_i + ∂mean_i, in one vectorised pass where
    `torch.addcmul` broadcasting s and c runs its slower strided kernel."""
    fn = _kernels(X)["group_affine"]
    N, m, d = X.shape
    X = X.contiguous()
    out = torch.empty(X.shape, dtype=out_dtype or X.dtype, device=X.device)
    br, bd, extra = _row_tiles(d)
    if N * m:
        fn[(triton.cdiv(N * m, br),)](X, s.contiguous(), c.reshape(N, d).contiguous(), out,
                                      N * m, m, d, BLOCK_R=br, BLOCK_D=bd, ACC=_acc(X, s, c),
                                      **extra)
    return out


def projected_sq_norms(G: Tensor, W: Tensor) -> Tensor:
    """[R] float32: ‖G[r] − ⟨G[r], W[r]⟩ · W[r]‖² for G, W contiguous [R, d] — the squared
    norms of the decoder gradient's rows once `project_rows_` has run, without writing them
    (what the gradient clip needs ahead of `adam_rows_`)."""
    fn = _kernels(G)["projected_sq"]
    R, d = G.shape
    out = torch.empty(R, dtype=torch.float32, device=G.device)
    br, bd, extra = _row_tiles(d)
    if R:
        fn[(triton.cdiv(R, br),)](G.contiguous(), W.contiguous(), out, R, d, BLOCK_R=br,
                                  BLOCK_D=bd, ACC=_acc(G, W), **extra)
    return out


def adam_rows_(W: Tensor, G: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               lr: float | Tensor, step: Tensor, scale: Tensor, betas: tuple[float, float],
               eps: float, decoder: bool, unit_eps: float = 1e-8) -> Tensor:
    """A weight's optimiser step in one pass over its rows, in place (all float32, contiguous
    [R, d]): the gradient divided by the clip's `scale` and torch's Adam (`step` is the state's
    count, already incremented; `lr` a number or a device tensor). With `decoder`, first
    `project_rows_(G, W)` and after `unit_rows_(W, unit_eps)` — four passes over the decoder
    and its gradient in PyTorch's order, here one; G itself is left as it was (unprojected)."""
    fn = _kernels(W)["adam_rows"]
    for t in (W, G, exp_avg, exp_avg_sq):
        _rows_in_place(t)
        if t.dtype != torch.float32 or t.shape != W.shape:
            raise ValueError("adam_rows_ takes float32 [R, d] weights, gradient and moments")
    R, d = W.shape
    if not isinstance(lr, Tensor):
        lr = torch.full((), lr, dtype=torch.float64, device=W.device)  # a fill: no host copy
    beta1, beta2 = betas
    br, bd, extra = _row_tiles(d, "adam_elems", "adam_warps")
    if R:
        fn[(triton.cdiv(R, br),)](W, G, exp_avg, exp_avg_sq, lr, step, scale, R, d, beta1, beta2,
                                  1 - beta1, 1 - beta2, math.log(beta1), math.log(beta2), eps,
                                  unit_eps, BLOCK_R=br, BLOCK_D=bd, DECODER=decoder, **extra)
    for t in (W, exp_avg, exp_avg_sq):
        torch.autograd.graph.increment_version(t)
    return W


def expert_rows(Y: Tensor, dest: Tensor, order: Tensor, expert: Tensor, b: Tensor,
                out_dtype: torch.dtype, scale: Tensor | None = None,
                offset: Tensor | None = None) -> Tensor:
    """[P, m]: row order[p] is Y[dest[p]] + b[expert[p]], added in float32 and rounded once to
    `out_dtype` — `(Y[dest].float() + b.float()[expert]).to(out_dtype)` scattered back by
    `index_copy(0, order, ·)` (the grouped GEMM's epilogue in `moe.grouped_expert_encode_gmm`),
    one pass instead of six. Y [rows, m] with unit column stride, b [N, m]. With `scale` [N]
    and `offset` [P] (in pair order: pair order[p]'s), Feature Scaling folded in: row order[p]
    is scale[expert[p]] · Y[dest[p]] + offset[order[p]] + b[expert[p]], in float32."""
    fn = _kernels(Y)["expert_rows"]
    P, m = order.numel(), Y.shape[1]
    out = torch.empty(P, m, dtype=out_dtype, device=Y.device)
    if Y.stride(1) != 1:
        Y = Y.contiguous()
    scaled = scale is not None
    if scaled:
        scale, offset = scale.float().contiguous(), offset.float().contiguous()
    else:
        scale = offset = b  # not read
    br, bm, extra = _row_tiles(m)
    if P and m:
        fn[(triton.cdiv(P, br),)](Y, dest.contiguous(), order.contiguous(), expert.contiguous(),
                                  b.contiguous(), scale, offset, out, P, m, Y.stride(0),
                                  BLOCK_R=br, BLOCK_M=bm, SCALED=scaled, **extra)
    return out


def group_sums(G: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_j G[i, j, :] as [N, 1, d], Σ_j ⟨G[i, j, :], W[i, j, :]⟩ as [N]) for G, W [N, m, d]:
    Feature Scaling's two reductions of its backward, `G.sum(1, keepdim=True)` and
    `linalg.vecdot` per expert, from one read of G and W (PyTorch's vecdot writes and reads
    back the products). Accumulated in float32 (float64 for float64 inputs), in the inputs'
    promoted dtype out."""
    fn = _kernels(G)["group_sums"]
    N, m, d = G.shape
    acc = torch.float64 if torch.float64 in (G.dtype, W.dtype) else torch.float32
    br, bd = BLOCKS["sums_rows"], min(BLOCKS["sums_d"], triton.next_power_of_2(max(d, 1)))
    grid = (N, triton.cdiv(m, br), triton.cdiv(d, bd))
    colsum = torch.empty(N, grid[1], d, dtype=acc, device=G.device)  # every element written
    dots = torch.empty(N, grid[1] * grid[2], dtype=acc, device=G.device)
    if N and m and d:
        fn[grid](G.contiguous(), W.contiguous(), colsum, dots, m, d, BLOCK_R=br, BLOCK_D=bd,
                 ACC=_acc(G, W), **_warps("sums_warps"))
    out = torch.promote_types(G.dtype, W.dtype)
    return colsum.sum(1, keepdim=True).to(out), dots.sum(1).to(out)


def squared_error(A: Tensor, Bt: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ (A − Bt)², Σ_r ‖Bt[r] − mean_r Bt‖²) for A, Bt [R, d] (R ≥ 1), as float32 0-dim
    tensors, from one read of each, in float64 sums (the second as Σ‖Bt[r]‖² − ‖Σ_r Bt[r]‖² /
    R): what `F.mse_loss(A, Bt, reduction="sum")` and `base.centred_sq_sum(Bt)` compute in six
    passes — a reconstruction's squared error and the FVU's denominator. Two launches: the
    partial sums (`loss_rows` rows, `loss_d` columns a program), then one program adding them."""
    ks = _kernels(A)
    A, Bt = A.contiguous(), Bt.contiguous()
    R, d = Bt.shape
    rows = BLOCKS["loss_rows"]
    bd = min(BLOCKS["loss_d"], triton.next_power_of_2(max(d, 1)))
    grid = (triton.cdiv(R, rows), triton.cdiv(d, bd))
    sse = torch.empty(grid[0] * grid[1], dtype=torch.float64, device=A.device)
    sq = torch.empty_like(sse)
    colsum = torch.empty(grid[0], d, dtype=torch.float64, device=A.device)
    out = torch.empty(2, dtype=torch.float32, device=A.device)
    ks["squared_error"][grid](A, Bt, sse, sq, colsum, R, d, ROWS=rows,
                              BLOCK_R=min(rows, BLOCKS["loss_block"]), BLOCK_D=bd,
                              **_warps("loss_warps"))
    ks["squared_error_total"][(1,)](sse, sq, colsum, out, sse.numel(), grid[0], d, R,
                                    BLOCK=BLOCKS["loss_total"], BLOCK_B=64, BLOCK_C=64,
                                    **_warps("loss_warps"))
    return out[0], out[1]


def scaled_diff(A: Tensor, Bt: Tensor, g: Tensor) -> Tensor:
    """(A − Bt) · 2g for A, Bt of one shape and g a one-element tensor (read on the device, so
    nothing waits for it): the squared error's gradient, as `F.mse_loss`'s backward, in one
    pass."""
    fn = _kernels(A)["scaled_diff"]
    A, Bt = A.contiguous(), Bt.contiguous()
    out = torch.empty_like(A)
    n = A.numel()
    if n:
        block = BLOCKS["diff_elems"]
        fn[(triton.cdiv(n, block),)](A, Bt, g.reshape(1), out, n, BLOCK=block,
                                     **_warps("diff_warps"))
    return out


_INF_BITS = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
"""Infinity's magnitude bits: a value whose magnitude bits are above these is a NaN."""

TOPK_MAX_N = 4096
"""`row_topk` holds whole rows in a program: rows of up to this many candidates (a routed SAE's
e·m; dense TopK's M takes `torch.topk`)."""


def row_topk_takes(f: Tensor, k: int) -> bool:
    """Whether `row_topk` takes f and k: [R, n] rows of float32, bfloat16 or float16, n at most
    TOPK_MAX_N, 0 < k ≤ n."""
    return f.dim() == 2 and f.dtype in _INF_BITS and 0 < k <= f.shape[1] <= TOPK_MAX_N


def row_topk(f: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`f.topk(k, dim=-1, sorted=False)` for f [R, n] in float32, bfloat16 or float16 with
    n ≤ TOPK_MAX_N: the same values, and their positions (any of tied ones, as torch.topk)."""
    if not row_topk_takes(f, k):
        raise ValueError(f"row_topk takes float32/bf16/fp16 rows of at most {TOPK_MAX_N} and 0 < k ≤ n")
    fn = _kernels(f)["row_topk"]
    R, n = f.shape
    if f.stride(1) != 1:
        f = f.contiguous()
    vals = torch.empty(R, k, dtype=f.dtype, device=f.device)
    pos = torch.empty(R, k, dtype=torch.long, device=f.device)
    br, bn, extra = _row_tiles(n, "topk_elems", "topk_warps")
    if R:
        fn[(triton.cdiv(R, br),)](f, vals, pos, R, n, k, f.stride(0), BLOCK_R=br, BLOCK_N=bn,
                                  BITS=8 * f.element_size(), INF=_INF_BITS[f.dtype],
                                  EARLY=bool(BLOCKS["topk_early"]),
                                  KEY64=f.element_size() > 2 or not BLOCKS["topk_narrow"], **extra)
    return vals, pos


def top_experts_takes(probs: Tensor, e: int) -> bool:
    """Whether `top_experts` takes probs and e: [R, n] float32 rows, n at most TOPK_MAX_N,
    0 < e ≤ n."""
    return probs.dim() == 2 and probs.dtype == torch.float32 and 0 < e <= probs.shape[1] <= TOPK_MAX_N


def top_experts(probs: Tensor, e: int) -> Tensor:
    """[R, e] int64: the columns of `probs.topk(e, dim=-1)` — each row's e largest router
    probabilities' experts, largest first (a token's top-1 expert in column 0, as the load
    balance reads it) — for probabilities (≥ 0, or NaN) in float32 rows of at most TOPK_MAX_N:
    one kernel where `torch.topk` runs a radix select and a sort."""
    if not top_experts_takes(probs, e):
        raise ValueError(f"top_experts takes float32 rows of at most {TOPK_MAX_N} and 0 < e ≤ n")
    fn = _kernels(probs)["top_experts"]
    R, n = probs.shape
    out = torch.empty(R, e, dtype=torch.long, device=probs.device)
    br, bn, extra = _row_tiles(n, "route_elems", "route_warps")
    if R:
        fn[(triton.cdiv(R, br),)](probs, out, R, n, e, probs.stride(0), BLOCK_R=br, BLOCK_N=bn,
                                  **extra)
    return out


def _plan_blocks(P: int, N: int) -> tuple[int, int, int] | None:
    """(pairs a program, blocks, padded experts) for `expert_plan`, or None where its tiles
    would exceed `BLOCKS`' plan_elems / plan_parts."""
    bn = triton.next_power_of_2(max(N, 1))
    block = max(16, BLOCKS["plan_elems"] // bn)
    nb = triton.cdiv(max(P, 1), block)
    if block * bn > BLOCKS["plan_elems"] or triton.next_power_of_2(nb) * bn > BLOCKS["plan_parts"]:
        return None
    return block, nb, bn


def expert_plan_takes(P: int, N: int) -> bool:
    """Whether `expert_plan` takes P pairs over N experts (its tiles fit `BLOCKS`)."""
    return _plan_blocks(P, N) is not None


def expert_plan(experts: Tensor, N: int, align: int) -> tuple[Tensor, Tensor]:
    """The grouped GEMM's layout for pairs naming `experts` [P] (values in [0, N)): (dest [P]
    int64, the buffer row of each pair — expert groups in order, each starting at a multiple
    of `align` rows, each group's pairs in pair order, as a stable sort by expert leaves them;
    ends [N] int32, one past each group's padded end). Two kernels (each block's counts, then
    every pair's row), where PyTorch takes a radix sort and a dozen small passes."""
    plan = _plan_blocks(experts.numel(), N)
    if plan is None:
        raise ValueError("expert_plan's tiles do not hold this many pairs and experts")
    block, nb, bn = plan
    P = experts.numel()
    experts = experts.reshape(-1).contiguous()
    counts = torch.empty(nb, bn, dtype=torch.int32, device=experts.device)
    dest = torch.empty(P, dtype=torch.long, device=experts.device)
    ends = torch.empty(bn, dtype=torch.int32, device=experts.device)
    fns = _kernels(experts)
    extra = _warps("plan_warps")
    fns["expert_counts"][(nb,)](experts, counts, P, BLOCK=block, BLOCK_N=bn, **extra)
    fns["expert_dest"][(nb,)](experts, counts, dest, ends, P, nb, align, BLOCK=block, BLOCK_N=bn,
                              BLOCK_B=triton.next_power_of_2(nb), **extra)
    return dest, ends[:N]


def pack_rows(X: Tensor, tokens: Tensor, dest: Tensor, out: Tensor) -> Tensor:
    """out[dest[q]] = X[tokens[q]] for each q, in place (rows of X [T, d] into out [R, d] of
    X's dtype): the grouped GEMM's buffer filled in one pass, where indexing gathers the rows
    and `index_copy_` scatters them."""
    if out.dtype != X.dtype or out.shape[1:] != X.shape[1:] or not out.is_contiguous():
        raise ValueError("pack_rows writes contiguous rows of X's width and dtype")
    P, d = dest.numel(), X.shape[1]
    if X.stride(1) != 1:
        X = X.contiguous()
    if P and d:
        br, bd = BLOCKS["pack_rows"], min(BLOCKS["pack_d"], triton.next_power_of_2(d))
        _kernels(X)["pack_rows"][(triton.cdiv(P, br), triton.cdiv(d, bd))](
            X, tokens.contiguous(), dest.contiguous(), out, P, d, X.stride(0), BLOCK_R=br,
            BLOCK_D=bd, **_warps("pack_warps"))
    return out


def centred_rows(X: Tensor, c: Tensor, dtype: torch.dtype) -> Tensor:
    """(X − c) for float32 rows X [R, d] and c [d], rounded once to `dtype` [R, d]: the rows a
    bf16 product reads, from one read of X, where PyTorch writes X − c in float32 and then
    copies it to bf16 (what autocast's cast computes: the same bits)."""
    if X.dim() != 2 or c.shape != X.shape[1:] or X.dtype != torch.float32 or c.dtype != torch.float32:
        raise ValueError("centred_rows takes float32 rows [R, d] and a float32 centre [d]")
    R, d = X.shape
    if X.stride(1) != 1:
        X = X.contiguous()
    out = torch.empty(R, d, dtype=dtype, device=X.device)
    br, bd, extra = _row_tiles(d)
    if R:
        _kernels(X)["centred_rows"][(triton.cdiv(R, br),)](X, c.contiguous(), out, R, d, X.stride(0),
                                                           BLOCK_R=br, BLOCK_D=bd, **extra)
    return out


def picks(pos: Tensor, top: Tensor, pre: Tensor, experts: Tensor | None, m: int,
          out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """What the sparse TopK keeps of its k picks a token, in one pass: (features [B, k] int64,
    slots [B, k] int64 or None, z = ReLU(pre[b, pos]) [B, k] float32, the codes ReLU(top)
    [B, k] in `out_dtype`), for candidate positions `pos` [B, k], their weighted values `top`
    [B, k] and the candidates' pre-activations before weighting `pre` [B, n]; with `experts`
    [B, e] candidate p is row p % m of expert experts[b, p // m] (its slot p // m), else
    feature p. PyTorch takes a gather, two ReLUs, two casts and five index passes."""
    B, k = pos.shape
    if top.shape != (B, k) or pre.shape[0] != B or pre.stride(1) != 1:
        raise ValueError("picks takes positions and values [B, k] and row-major candidates [B, n]")
    dev = pos.device
    idx = torch.empty(B, k, dtype=torch.long, device=dev)
    slot = torch.empty(B, k, dtype=torch.long, device=dev) if experts is not None else None
    z = torch.empty(B, k, dtype=torch.float32, device=dev)
    vals = torch.empty(B, k, dtype=out_dtype, device=dev)
    br, bk, extra = _row_tiles(k, "picks_elems", "picks_warps")
    if B and k:
        e = experts.shape[1] if experts is not None else 1
        _kernels(pos)["picks"][(triton.cdiv(B, br),)](
            pos.contiguous(), top.contiguous(), pre,
            experts.contiguous() if experts is not None else pos, idx,
            slot if slot is not None else idx, z, vals, B, k, e, m, pre.stride(0), BLOCK_R=br,
            BLOCK_K=bk, ROUTED=experts is not None, **extra)
    return idx, slot, z, vals


def pick_grads(g: Tensor, z: Tensor, slot: Tensor, weights: Tensor, experts: Tensor,
               n_experts: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """The routed sparse TopK's backward over its picks in one pass, for picks [B, k] with
    gradients g, values before weighting z (≥ 0) and expert slots `slot`, the tokens' expert
    weights [B, e] and experts [B, e]: (g_pre = g · w_slot where z > 0, else 0 [B, k] float32;
    ∂w [B, e] in weights' dtype, Σ over each slot's picks of g · z; with n_experts > 0,
    [B, n_experts] float32 of Σ g_pre over each slot's picks at the slot's expert, else None).
    PyTorch takes a gather, a where and three scatter-adds into zeroed tensors."""
    B, k = g.shape
    e = weights.shape[1]
    if (z.shape != (B, k) or slot.shape != (B, k) or weights.shape != (B, e)
            or experts.shape != (B, e)):
        raise ValueError("pick_grads takes g, z, slot [B, k] and weights, experts [B, e]")
    dev = g.device
    g_pre = torch.empty(B, k, dtype=torch.float32, device=dev)
    grad_w = torch.empty(B, e, dtype=weights.dtype, device=dev)
    per = torch.empty(B, n_experts, dtype=torch.float32, device=dev) if n_experts else None
    width = max(k, n_experts)
    br, _, extra = _row_tiles(width, "pick_grads_elems", "pick_grads_warps")
    if B:
        _kernels(g)["pick_grads"][(triton.cdiv(B, br),)](
            g.contiguous(), z.contiguous(), slot.contiguous(), weights.contiguous(),
            experts.contiguous(), g_pre, grad_w, per if per is not None else g_pre, B, k, e,
            max(n_experts, 1), BLOCK_R=br, BLOCK_K=triton.next_power_of_2(max(k, 1)),
            BLOCK_N=triton.next_power_of_2(max(n_experts, 1)), PER_EXPERT=per is not None,
            **extra)
    return g_pre, grad_w, per
