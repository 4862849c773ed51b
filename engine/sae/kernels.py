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

The kernels are plain Python functions compiled by `triton.jit` when this module is imported
on a machine with CUDA; the tests run the same functions through Triton's interpreter on the
CPU (`interpreted()`) and compiled on CUDA, against the `embedding_bag` forms they replace.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch ships without triton: the engine uses embedding_bag
    triton = None
    tl = None

BLOCKS: dict[str, int] = {"segment_d": 256, "segment_p": 16, "segment_warps": 2,
                          "dots_d": 32, "dots_warps": 2}
"""Tile sizes: the columns and rows a `segment_sum` program handles at once and its warps; the
columns a `picked_dots` program reads at once and its warps (benchmarks/profile_gpu.py
--parts kernels times the choices)."""


def _segment_sum_kernel(X, ix, w, offsets, out, d, stride_x, stride_out,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[r, cols] = Σ_(p in [offsets[r], offsets[r + 1])) w[p] · X[ix[p], cols]."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(offsets + r)
    end = tl.load(offsets + r + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        rows = tl.load(ix + p, mask=pmask, other=0).to(tl.int64)
        wts = tl.load(w + p, mask=pmask, other=0.0).to(ACC)
        tile = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                       mask=pmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(tile * wts[:, None], axis=0)
    tl.store(out + r.to(tl.int64) * stride_out + cols, acc.to(out.dtype.element_ty), mask=cmask)


def _picked_dots_kernel(G, W, idx, out, k, d, stride_g, stride_w,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[b, j] = Σ_c G[b, c] · W[idx[b, j], c] for the k picks of token b."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K)
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


@functools.cache
def _compiled():
    """The two kernels through `triton.jit`: compiled for the GPU, or run by Triton's
    interpreter on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported
    (tests/conftest.py does so on machines without CUDA)."""
    return triton.jit(_segment_sum_kernel), triton.jit(_picked_dots_kernel)


def available(device: torch.device) -> bool:
    """True where these kernels run compiled: a CUDA device and an importable triton."""
    return triton is not None and device.type == "cuda"


def interpreted() -> bool:
    """True where the kernels run on CPU tensors, through Triton's interpreter."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(t: Tensor):
    if not (available(t.device) or interpreted()):
        raise RuntimeError(f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1), not {t.device}")
    return _compiled()


def _acc(*ts: Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in ts) else tl.float32


def segment_sum(X: Tensor, ix: Tensor, w: Tensor, offsets: Tensor,
                out_dtype: torch.dtype = torch.float32) -> Tensor:
    """[R, d]: row r is Σ w[p] · X[ix[p]] over p in [offsets[r], offsets[r + 1]) — what
    `embedding_bag(ix, X, offsets[:-1], mode="sum", per_sample_weights=w)` computes, with R + 1
    offsets (the last one the number of picks)."""
    seg, _ = _kernels(X)
    X = X.contiguous()
    R, d = offsets.numel() - 1, X.shape[1]
    out = torch.empty(R, d, dtype=out_dtype, device=X.device)
    if R == 0 or d == 0:
        return out.zero_()
    bd = min(BLOCKS["segment_d"], triton.next_power_of_2(d))
    grid = (R, triton.cdiv(d, bd))
    extra = {} if X.device.type != "cuda" else {"num_warps": BLOCKS["segment_warps"]}
    seg[grid](X, ix.contiguous(), w.contiguous(), offsets.contiguous(), out, d, X.stride(0),
              out.stride(0), BLOCK_P=BLOCKS["segment_p"], BLOCK_D=bd, ACC=_acc(X, w), **extra)
    return out


def picked_dots(G: Tensor, W: Tensor, idx: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, k]: ⟨G[b], W[idx[b, j]]⟩ for each pick (a sampled dense-dense product)."""
    _, dots = _kernels(G)
    B, k = idx.shape
    G, W = G.contiguous(), W.contiguous()
    out = torch.empty(B, k, dtype=out_dtype, device=G.device)
    if B == 0 or k == 0:
        return out
    extra = {} if G.device.type != "cuda" else {"num_warps": BLOCKS["dots_warps"]}
    bd = min(BLOCKS["dots_d"], triton.next_power_of_2(W.shape[1]))
    dots[(B,)](G, W, idx.contiguous(), out, k, W.shape[1], G.stride(0), W.stride(0),
               BLOCK_K=triton.next_power_of_2(k), BLOCK_D=bd, ACC=_acc(G, W), **extra)
    return out
