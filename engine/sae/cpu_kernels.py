"""Numba kernels for the sparse step on the CPU.

Two products of a CPU training step ran as PyTorch kernels that do per-row or per-pick work
one element at a time (torch profiler, the benchmark's Scale e=2 step: B 4,096, d 576, M 4,608,
N 16, k 32, two threads):

| product (METHOD §1)                          | PyTorch's kernel                         | here |
|----------------------------------------------|------------------------------------------|------|
| TopK_k of each token's candidates f [B, n]   | `torch.topk`: a partial sort of (value, index) pairs per row | `topk` |
| ∂z[b, j] = ⟨∂x̂[b], W_dec[idx[b, j]]⟩        | `embedding_bag`'s per-sample-weights backward | `picked_dots` |

`topk` finds each row's k largest without sorting anything: by bisection on order-preserving
integer keys of the floats (an int32 whose order is the float's), counting the keys at or
above the midpoint in a vectorised pass, and stopping as soon as exactly k are. The search
starts between t, the smallest of the maxima of k chunks of the row (k distinct values
reach it, so t is at most the k-th largest), and the row's largest value; once at most 4k
keys remain at or above the lower end, only those are kept and searched. Long rows (dense
TopK's M candidates) first take t as the k-th largest of the maxima of blocks of L values,
and only blocks whose maximum reaches t are read again. The picks are every key above the
k-th largest, then as many equal to it as make k (with ties, any of the tied positions may be
returned, as with `torch.topk`). NaN counts as larger than any number, as in `torch.topk`: a
row holding a NaN skips the bounds and is searched whole.

The kernels are compiled by numba at their first call (cached on disk beside this file, or
in numba's user cache where that is read-only), release the GIL, and run on as many threads
as PyTorch has, each taking its own range of rows (`_split_rows`). `use` decides where they run: float32 CPU tensors, numba importable, and
not `MOESAE_NUMBA=0`. The tests hold them to `torch.topk` and to `embedding_bag`'s kernel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:
    import numba
    from numba import njit
except ImportError:  # numba comes with umap-learn; without it the engine keeps PyTorch's kernels
    numba = None

ENABLED = os.environ.get("MOESAE_NUMBA", "1") != "0"
"""`MOESAE_NUMBA=0` in the environment keeps PyTorch's kernels on the CPU."""

MIN_ROWS = 256
"""Rows a thread takes at least: smaller calls run on the calling thread alone."""

CHUNKS_PER_THREAD = 8
"""Chunks of rows per thread in `_split_rows`'s queue."""


def use(t: Tensor) -> bool:
    """Whether the numba kernels run for tensor `t`: float32 on the CPU, numba importable."""
    return ENABLED and numba is not None and t.device.type == "cpu" and t.dtype == torch.float32


_POOL: dict = {"pid": None, "workers": 0, "pool": None}


def _split_rows(kernel, B: int, *args, min_rows: int = MIN_ROWS) -> None:
    """kernel(lo, hi, *args) over rows [0, B), on as many threads as PyTorch has (each with at
    least `min_rows` rows): the calling thread and a pool of threads take chunks of rows from
    one shared queue until it is empty, so a thread that starts late (its core still busy
    with PyTorch's spinning OpenMP workers) takes fewer. The kernels release the GIL, so the
    chunks run at once. A pool rather than numba's own threads: OpenMP's workers spin after
    each parallel region, and on a 2-core machine that spinning took the cores from PyTorch's
    next kernels and from the other process of a data-parallel run (3× slower steps there);
    these threads sleep. The pool is made again in a forked child, whose copy has no threads."""
    parts = max(1, min(torch.get_num_threads(), B // min_rows))
    if parts == 1:
        kernel(0, B, *args)
        return
    pool = _POOL["pool"]
    if _POOL["pid"] != os.getpid() or _POOL["workers"] < parts - 1:
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


if numba is not None:
    _KEY_MAX = np.int32(0x7FFFFFFF)

    @njit(inline="always")
    def _key(bits):
        """An int32 whose order is the float32's order (bits as the float's int32 view); every
        NaN maps above +inf, as `torch.topk` orders them."""
        if (bits & _KEY_MAX) > np.int32(0x7F800000):
            return _KEY_MAX
        return bits ^ ((bits >> np.int32(31)) & _KEY_MAX)

    # NaN and infinities keep their meaning (no nnan/ninf): the maxima are exact for any row
    # without a NaN, and `x != x` still finds the NaN
    _FLAGS = {"nsz", "reassoc", "arcp", "contract"}

    @njit(fastmath=_FLAGS, nogil=True, cache=True)
    def _block_maxima(row, L, bm):
        n = row.shape[0]
        for q in range(bm.shape[0]):
            mx = row[q * L]
            for j in range(q * L + 1, min(n, q * L + L)):
                mx = max(mx, row[j])
            bm[q] = mx

    @njit(fastmath=_FLAGS, nogil=True, cache=True)
    def _has_nan(row):
        cnt = 0
        for j in range(row.shape[0]):
            cnt += 1 if row[j] != row[j] else 0
        return cnt > 0

    @njit(fastmath=_FLAGS, nogil=True, cache=True)
    def _chunk_bounds(row, k):
        """(t, top): the smallest and the largest of the maxima of k chunks of the row — t is at
        most its k-th largest value (k distinct values reach it), top its largest."""
        n = row.shape[0]
        c = n // k
        t = row[0]
        top = row[0]
        for q in range(k):
            lo = q * c
            hi = n if q == k - 1 else lo + c
            mx = row[lo]
            for j in range(lo + 1, hi):
                mx = max(mx, row[j])
            t = mx if q == 0 else min(t, mx)
            top = max(top, mx)
        return t, top

    @njit(nogil=True, cache=True)
    def _float_key(x):
        return _key(np.float32(x).view(np.int32))

    @njit(nogil=True, cache=True)
    def _kth(keys, pos, m, k, lo, hi):
        """(x, m'): bisection on the integer keys for the k-th largest of keys[:m] (k ≤ m,
        lo ≤ it ≤ hi), stopping early at any x with exactly k keys ≥ x (which selects the
        same picks). Once at most 4k keys are ≥ x, the smaller ones are dropped (keys and
        their positions `pos` moved down together) and the search goes on over those m'."""
        lo = np.int64(lo)
        hi = np.int64(hi)
        while lo < hi:
            mid = np.int32((lo + hi + 1) >> 1)
            cnt = 0
            for j in range(m):
                cnt += 1 if keys[j] >= mid else 0
            if cnt >= k:
                lo = np.int64(mid)
                if cnt == k:
                    break
                if cnt <= 4 * k < m:
                    kept = 0
                    for j in range(m):
                        kk = keys[j]
                        keys[kept] = kk
                        pos[kept] = pos[j]
                        kept += 1 if kk >= mid else 0
                    m = kept
            else:
                hi = np.int64(mid) - 1
        return np.int32(lo), m

    @njit(nogil=True, cache=True)
    def _select_row(row, bits, k, L, bm, bk, bp, ck, ci, out_v, out_i):
        """The k largest of one row: out_i their positions, out_v their values."""
        n = row.shape[0]
        nan = _has_nan(row)
        if L > 0 and not nan:  # long rows: only the blocks whose maximum reaches the bound
            nb = bm.shape[0]
            _block_maxima(row, L, bm)
            for q in range(nb):
                bk[q] = _float_key(bm[q])
                bp[q] = q
            lo = bk[0]
            hi = bk[0]
            for q in range(1, nb):
                lo = min(lo, bk[q])
                hi = max(hi, bk[q])
            t, _ = _kth(bk, bp, nb, k, lo, hi)  # ≤ the row's k-th largest: k blocks reach it
            m = 0
            for q in range(nb):
                if _float_key(bm[q]) < t:
                    continue
                for j in range(q * L, min(n, q * L + L)):
                    kk = _key(bits[j])
                    ck[m] = kk
                    ci[m] = j
                    m += 1 if kk >= t else 0
        else:  # every value a candidate, the search starting from the chunks' bounds
            for j in range(n):
                ck[j] = _key(bits[j])
                ci[j] = j
            m = n
            if nan:
                t, hi = np.int32(-0x80000000), _KEY_MAX
            else:
                lo_f, hi_f = _chunk_bounds(row, k)
                t, hi = _float_key(lo_f), _float_key(hi_f)
        kth, m = _kth(ck, ci, m, k, t, hi)
        o = 0
        for j in range(m):
            if ck[j] > kth:
                out_i[o] = ci[j]
                o += 1
        for j in range(m):
            if o < k and ck[j] == kth:
                out_i[o] = ci[j]
                o += 1
        for j in range(k):
            out_v[j] = row[out_i[j]]

    @njit(nogil=True, cache=True)
    def _topk_rows(lo, hi, f, k, L, out_v, out_i):
        n = f.shape[1]
        bits = f.view(np.int32)
        nb = (n + L - 1) // L if L > 0 else 1
        bm = np.empty(nb, np.float32)
        bk = np.empty(nb, np.int32)
        bp = np.empty(nb, np.int64)
        ck = np.empty(n, np.int32)
        ci = np.empty(n, np.int64)
        for b in range(lo, hi):
            _select_row(f[b], bits[b], k, L, bm, bk, bp, ck, ci, out_v[b], out_i[b])

    @njit(nogil=True, cache=True)
    def _group_by_row(flat, k, g, n_rows, starts, tokens, w):
        """A counting sort of the picks by the row they name, stable: starts [n_rows + 1]
        where each row's picks begin, and in that order each pick's token (p // k) and g."""
        starts[:] = 0
        for p in range(flat.shape[0]):
            starts[flat[p] + 1] += 1
        for r in range(n_rows):
            starts[r + 1] += starts[r]
        fill = starts[:n_rows].copy()
        for p in range(flat.shape[0]):
            r = flat[p]
            q = fill[r]
            fill[r] = q + 1
            tokens[q] = p // k
            w[q] = g[p]

    @njit(nogil=True, cache=True)
    def _topk_expert_rows(lo, hi, pre, bias, rows, w, experts, dead, use_dead, k, L, out_v,
                          out_i, out_z):
        """For tokens b in [lo, hi): the token's candidates f = concat_s w[b, s] · (pre[rows[b, s]]
        + bias[expert]) (each of its e experts' m pre-activations, in slot order; −inf where
        `use_dead` and the feature is not dead), their k largest (out_v, positions s·m + j in
        out_i) and the pre-activations at those positions before weighting (out_z)."""
        e = rows.shape[1]
        m = pre.shape[1]
        n = e * m
        row = np.empty(n, np.float32)
        bits = row.view(np.int32)
        nb = (n + L - 1) // L if L > 0 else 1
        bm = np.empty(nb, np.float32)
        bk = np.empty(nb, np.int32)
        bp = np.empty(nb, np.int64)
        ck = np.empty(n, np.int32)
        ci = np.empty(n, np.int64)
        for b in range(lo, hi):
            for s in range(e):
                r = rows[b, s]
                ws = w[b, s]
                base = experts[b, s] * m
                for j in range(m):
                    row[s * m + j] = ws * (pre[r, j] + bias[base + j])
                if use_dead:
                    for j in range(m):
                        if not dead[base + j]:
                            row[s * m + j] = -np.inf
            _select_row(row, bits, k, L, bm, bk, bp, ck, ci, out_v[b], out_i[b])
            for t in range(k):
                p = out_i[b, t]
                s = p // m
                out_z[b, t] = pre[rows[b, s], p % m] + bias[experts[b, s] * m + p % m]

    @njit(fastmath=True, nogil=True, cache=True)
    def _picked_dots_rows(lo, hi, g, W, idx, out):
        k = idx.shape[1]
        d = g.shape[1]
        for b in range(lo, hi):
            for j in range(k):
                r = idx[b, j]
                s = np.float32(0.0)
                for c in range(d):
                    s += g[b, c] * W[r, c]
                out[b, j] = s


BLOCK = 16
"""Values per block of `topk`'s bound."""

LONG_ROW = 32
"""Rows of at least LONG_ROW·k values take the bound from block maxima; shorter rows search
all their values at once. Measured on the development CPU (2 threads, 4,096 rows, k 32, ms):

| values a row | torch.topk | all values | blocks of 8 | blocks of 16 | blocks of 32 |
|---:|---:|---:|---:|---:|---:|
| 288 | 5.88 | **1.62** | 2.81 | | |
| 576 | 10.84 | **2.30** | 3.58 | 4.00 | |
| 1,152 | 20.30 | 5.68 | **4.91** | 5.10 | 6.36 |
| 2,304 | 21.76 | 7.78 | 7.65 | **7.09** | 8.04 |
| 4,608 | 29.49 | 14.32 | 13.75 | **11.17** | 11.18 |
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
        _split_rows(_topk_rows, B, f.numpy(), k, block_length(n, k), vals.numpy(), pos.numpy())
    return vals, pos


def topk_expert_rows(pre: Tensor, bias: Tensor, rows: Tensor, w: Tensor, experts: Tensor,
                     k: int, dead: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The TopK of each token over its experts' weighted candidates, read where the expert
    encode left them: pre [P, m] float32 holds one row of m products W_i x per (token, expert)
    pair, bias [N, m] the experts' biases, rows [B, e] names each token's rows (in slot order),
    w [B, e] their weights, experts [B, e] the experts. The candidates of token b are
    concat_s w[b, s] · (pre[rows[b, s]] + bias[experts[b, s]]) — what `moe._weighted` of the
    pairs put back in token order gives, without that copy, the weighted one, or the bias
    written into each expert's block before its matmul. With `dead` [M] (AuxK) a feature that
    is not dead counts as −inf.

    Returns (values [B, k], positions s·m + j [B, k], pre-activations at the picks before
    weighting [B, k])."""
    B, e = rows.shape
    m = pre.shape[1]
    if not 0 < k <= e * m:
        raise ValueError(f"topk: k = {k} for rows of {e * m} values")
    vals = torch.empty(B, k, dtype=torch.float32)
    pos = torch.empty(B, k, dtype=torch.long)
    z = torch.empty(B, k, dtype=torch.float32)
    use_dead = dead is not None
    dead_np = (dead if use_dead else torch.zeros(1, dtype=torch.bool)).contiguous().numpy()
    if B:
        _split_rows(_topk_expert_rows, B, pre.contiguous().numpy(),
                    bias.to(torch.float32).contiguous().view(-1).numpy(), rows.contiguous().numpy(),
                    w.to(torch.float32).contiguous().numpy(), experts.contiguous().numpy(),
                    dead_np, use_dead, k, block_length(e * m, k), vals.numpy(), pos.numpy(),
                    z.numpy())
    return vals, pos, z


def group_by_row(idx: Tensor, g: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The picks idx [B, k] sorted by the row they name (stable: by token within a row), as a
    counting sort: (starts [n_rows + 1], where each row's picks begin; tokens [B·k], each
    pick's token; w [B·k], its value of g [B, k]) — what `torch.argsort` of the rows, the
    counts and two gathers give, in two passes over the picks."""
    B, k = idx.shape
    n = B * k
    starts = torch.empty(n_rows + 1, dtype=torch.long)
    tokens = torch.empty(n, dtype=torch.long)
    w = torch.empty(n, dtype=g.dtype)
    _group_by_row(idx.reshape(-1).contiguous().numpy(), k, g.reshape(-1).contiguous().numpy(),
                  n_rows, starts.numpy(), tokens.numpy(), w.numpy())
    return starts, tokens, w


def picked_dots(g: Tensor, W: Tensor, idx: Tensor) -> Tensor:
    """[B, k]: ⟨g[b], W[idx[b, j]]⟩ for float32 g [B, d] and W [M, d] on the CPU; the dot
    products vectorised over d (float32 sums, reassociated)."""
    B, k = idx.shape
    out = torch.empty(B, k, dtype=g.dtype)
    if B:
        _split_rows(_picked_dots_rows, B, g.contiguous().numpy(), W.contiguous().numpy(),
                    idx.contiguous().numpy(), out.numpy())
    return out
