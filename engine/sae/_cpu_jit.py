"""The numba-compiled loops behind engine/sae/cpu_kernels.py (imported there at the first
kernel call, so that importing the engine does not import numba). Each `*_rows` kernel works
on a range of rows [lo, hi), which `cpu_kernels._split_rows` hands to its threads; all of them
release the GIL and are cached on disk after their first compilation."""

import numpy as np
from numba import njit

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
def _scratch(n, L):
    """`_select_row`'s buffers for rows of n values and blocks of L (allocated once a range)."""
    nb = (n + L - 1) // L if L > 0 else 1
    return (np.empty(nb, np.float32), np.empty(nb, np.int32), np.empty(nb, np.int64),
            np.empty(n, np.int32), np.empty(n, np.int64))


@njit(nogil=True, cache=True)
def _topk_rows(lo, hi, f, k, L, out_v, out_i):
    bits = f.view(np.int32)
    bm, bk, bp, ck, ci = _scratch(f.shape[1], L)
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
    bm, bk, bp, ck, ci = _scratch(n, L)
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
