"""Numba kernels for the sparse step on the CPU.

Parts of a CPU training step ran as PyTorch kernels that do per-row or per-pick work one
element at a time, or as copies between them (torch profiler, the benchmark's Scale e=2 step:
B 4,096, d 576, M 4,608, N 16, k 32, two threads):

| step (METHOD §1)                             | PyTorch                                  | here |
|----------------------------------------------|------------------------------------------|------|
| TopK_k of each token's candidates f [B, n]   | `torch.topk`: a partial sort of (value, index) pairs per row | `topk` |
| a routed SAE's candidates concat_i w_i · (W_i x + b_i) and their TopK | the experts' blocks concatenated, put back in token order, weighted, then `torch.topk` | `topk_expert_rows` |
| ∂z[b, j] = ⟨∂x̂[b], W_dec[idx[b, j]]⟩        | `embedding_bag`'s per-sample-weights backward | `picked_dots` |
| the picks grouped by feature for ∂W_enc, ∂W_dec | a stable `argsort`, counts and two gathers | `group_by_row` (a counting sort) |

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

The kernels (engine/sae/_cpu_jit.py, imported at the first call) are compiled by numba at
their first call (cached on disk beside the file, or in numba's user cache where that is
read-only), release the GIL, and run on as many threads as PyTorch has, each taking chunks of
rows (`_split_rows`). `use` decides where they run: float32 CPU tensors, numba installed, not
`MOESAE_NUMBA=0`, and the kernels working on a tiny case (`works`). The tests
(tests/engine/sae/test_cpu_kernels.py) hold them to the PyTorch forms.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

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


def _jit():
    """engine/sae/_cpu_jit.py, imported at the first kernel call (numba's import costs ~0.15 s
    of every command's start otherwise)."""
    from . import _cpu_jit

    return _cpu_jit


def use(t: Tensor) -> bool:
    """Whether the numba kernels run for tensor `t`: float32 on the CPU, numba installed, and
    the kernels working (`works`)."""
    return (ENABLED and AVAILABLE and t.device.type == "cpu" and t.dtype == torch.float32
            and works())


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

    try:
        gen = torch.Generator().manual_seed(0)
        f = torch.randn(3, 70, generator=gen)
        vals, pos = topk(f, 4)
        W, g = torch.randn(6, 5, generator=gen), torch.randn(3, 5, generator=gen)
        idx = torch.tensor([[0, 5], [2, 2], [1, 4]])
        rows = torch.tensor([[0, 1], [2, 3], [4, 5]])
        ev, epos, _ = topk_expert_rows(W, torch.zeros(3, 5), rows, torch.ones(3, 2),
                                       torch.tensor([[0, 1], [2, 0], [1, 2]]), 3)
        starts, tokens, w = group_by_row(idx, g[:, :2], 6)
        ok = (torch.equal(vals.sort(-1).values, f.topk(4).values.sort(-1).values)
              and torch.equal(ev.sort(-1).values, W.view(3, 10).topk(3).values.sort(-1).values)
              and torch.allclose(picked_dots(g, W, idx), (g[:, None] * W[idx]).sum(-1), atol=1e-5)
              and starts.tolist() == [0, 1, 2, 4, 4, 5, 6] and tokens.tolist() == [0, 2, 1, 1, 2, 0])
        if not ok:
            raise RuntimeError("they gave other numbers than PyTorch on a tiny case")
        return True
    except Exception as exc:  # any failure to import, compile or run: PyTorch's kernels instead
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(f"The numba kernels do not run here ({why}); training uses PyTorch's "
                      "kernels on the CPU, which are slower.", RuntimeWarning, stacklevel=3)
        return False


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
        _split_rows(_jit()._topk_rows, B, f.numpy(), k, block_length(n, k), vals.numpy(), pos.numpy())
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
        _split_rows(_jit()._topk_expert_rows, B, pre.contiguous().numpy(),
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
    _jit()._group_by_row(idx.reshape(-1).contiguous().numpy(), k,
                         g.reshape(-1).contiguous().numpy(), n_rows, starts.numpy(),
                         tokens.numpy(), w.numpy())
    return starts, tokens, w


def picked_dots(g: Tensor, W: Tensor, idx: Tensor) -> Tensor:
    """[B, k]: ⟨g[b], W[idx[b, j]]⟩ for float32 g [B, d] and W [M, d] on the CPU; the dot
    products vectorised over d (float32 sums, reassociated)."""
    B, k = idx.shape
    out = torch.empty(B, k, dtype=g.dtype)
    if B:
        _split_rows(_jit()._picked_dots_rows, B, g.contiguous().numpy(), W.contiguous().numpy(),
                    idx.contiguous().numpy(), out.numpy())
    return out
