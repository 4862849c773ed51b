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


# NaN and infinities keep their meaning in the float kernels' sums (no nnan/ninf)
_FLAGS = {"nsz", "reassoc", "arcp", "contract"}


@njit(nogil=True, cache=True)
def _count_at_least(keys, x):
    """How many of the keys are at least x (one vectorised pass)."""
    cnt = 0
    for j in range(keys.shape[0]):
        cnt += 1 if keys[j] >= x else 0
    return cnt


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
        cnt = _count_at_least(keys[:m], mid)
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
def _key_bounds(ck, k, mx):
    """(t, top) for the keys ck of a row of at least k values: the smallest and the largest of
    the maxima of its k strided groups {j : j mod k = q} (mx [≥ k], scratch) — t is at most
    the k-th largest key (k distinct keys reach it), top the largest. The groups are read as
    slices with loop indices from 0, so numba's handling of negative indices drops out and the
    loops vectorise (the maxima of k contiguous chunks, read with indices computed as q·c + j,
    became gathers: 1.1 against ~0.15 ms for 4,096 rows of 576 values, one thread)."""
    n = ck.shape[0]
    r = n // k
    for q in range(k):
        mx[q] = ck[q]
    for i in range(1, r):
        group = ck[i * k:(i + 1) * k]
        for q in range(k):
            v = group[q]
            mx[q] = v if v > mx[q] else mx[q]
    tail = ck[r * k:n]
    for q in range(tail.shape[0]):
        v = tail[q]
        mx[q] = v if v > mx[q] else mx[q]
    t = mx[0]
    top = mx[0]
    for q in range(1, k):
        t = min(t, mx[q])
        top = max(top, mx[q])
    return t, top


@njit(nogil=True, cache=True)
def _kth_short(keys, k, lo, hi):
    """The k-th largest of the keys (lo ≤ it ≤ hi) by bisection, stopping early at any x with
    exactly k keys ≥ x (which selects the same picks); every pass over all of them (a short
    row: moving the keys and positions down as `_kth` does cost more than it saved)."""
    lo = np.int64(lo)
    hi = np.int64(hi)
    while lo < hi:
        mid = np.int32((lo + hi + 1) >> 1)
        cnt = _count_at_least(keys, mid)
        if cnt >= k:
            lo = np.int64(mid)
            if cnt == k:
                break
        else:
            hi = np.int64(mid) - 1
    return np.int32(lo)


@njit(nogil=True, cache=True)
def _select_row(row, bits, k, L, bm, bk, bp, ck, ci, out_v, out_i):
    """The k largest of one row: out_i their positions, out_v their values."""
    n = row.shape[0]
    if L == 0:  # a short row: every value a candidate
        keys = ck[:n]
        for j in range(n):
            keys[j] = _key(bits[j])
        # NaN's key is above every number's, so the bounds hold for rows with NaN too
        t, hi = _key_bounds(keys, k, bk)
        kth = _kth_short(keys, k, t, hi)
        # the positions of the keys above the k-th (at most k), without a branch: each
        # position written, kept where its key is above (1.1 against 1.5 ms with a branch,
        # or one that stops at k, for 4,096 rows of 576 values, one thread)
        o = 0
        for j in range(n):
            ci[o] = j  # o ≤ j
            o += 1 if keys[j] > kth else 0
        for j in range(o):
            out_i[j] = ci[j]
        if o < k:
            for j in range(n):
                if keys[j] == kth:
                    out_i[o] = j
                    o += 1
                    if o == k:
                        break
        for j in range(k):
            out_v[j] = row[out_i[j]]
        return
    # a long row: only the blocks of L whose maximum reaches a bound are searched, all in keys
    keys = ck[n:2 * n]  # the row's keys; ck[:m] the candidates'
    for j in range(n):
        keys[j] = _key(bits[j])
    nb = bm.shape[0]
    for q in range(nb):  # each block's largest key, read through slices (they vectorise)
        block = keys[q * L:min(n, q * L + L)]
        mx = block[0]
        for j in range(block.shape[0]):
            v = block[j]
            mx = v if v > mx else mx
        bm[q] = mx
        bk[q] = mx
        bp[q] = q
    lo = bm[0]
    hi = bm[0]
    for q in range(1, nb):
        lo = min(lo, bm[q])
        hi = max(hi, bm[q])
    t, _ = _kth(bk, bp, nb, k, lo, hi)  # ≤ the row's k-th largest: k blocks reach it
    m = 0
    for q in range(nb):
        if bm[q] < t:
            continue
        block = keys[q * L:min(n, q * L + L)]
        for j in range(block.shape[0]):
            kk = block[j]
            ck[m] = kk
            ci[m] = q * L + j
            m += 1 if kk >= t else 0
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
def _scratch(n, L, k):
    """`_select_row`'s buffers for rows of n values, blocks of L and k picks (allocated once
    a range): the blocks' largest keys, a copy `_kth` reorders, their positions, the keys
    (the candidates', then the row's), the candidates' positions."""
    nb = (n + L - 1) // L if L > 0 else k
    return (np.empty(nb, np.int32), np.empty(nb, np.int32), np.empty(nb, np.int64),
            np.empty(2 * n, np.int32), np.empty(n, np.int64))


@njit(nogil=True, cache=True)
def _topk_rows(lo, hi, f, k, L, out_v, out_i):
    bits = f.view(np.int32)
    bm, bk, bp, ck, ci = _scratch(f.shape[1], L, k)
    for b in range(lo, hi):
        _select_row(f[b], bits[b], k, L, bm, bk, bp, ck, ci, out_v[b], out_i[b])


@njit(nogil=True, cache=True)
def _sort_picks(flat, n_rows, starts, order, rank):
    """A counting sort of the picks by the row they name, stable: starts [n_rows + 1] where
    each row's picks begin, and in that order each pick's position in `flat`; where `rank` is
    not empty, each pick's position in that order (the inverse permutation)."""
    starts[:] = 0
    for p in range(flat.shape[0]):
        starts[flat[p] + 1] += 1
    for r in range(n_rows):
        starts[r + 1] += starts[r]
    fill = starts[:n_rows].copy()
    ranked = rank.shape[0] > 0
    for p in range(flat.shape[0]):
        r = flat[p]
        order[fill[r]] = p
        if ranked:
            rank[p] = fill[r]
        fill[r] += 1


@njit(nogil=True, cache=True)
def _topk_expert_rows(lo, hi, pre, bias, rows, w, experts, dead, use_dead, scale, offset,
                      scaled, k, L, out_v, out_i, out_z, out_u, out_f, out_s):
    """For tokens b in [lo, hi): the token's candidates f = concat_s w[b, s] · (pre[rows[b, s]]
    + bias[expert]) (each of its e experts' m pre-activations, in slot order; −inf where
    `use_dead` and the feature is not dead), their k largest (out_v, positions s·m + j in
    out_i), the pre-activations at those positions before weighting (out_z) and the products
    they were made from (out_u: pre at the pick), their features (out_f: row j of expert i is
    feature i·m + j) and slots s (out_s). Where `scaled`, each pair's products are
    first scaled by its expert's scale and shifted by the pair's offset:
    scale[expert] · pre + offset[b, s]."""
    e = rows.shape[1]
    m = pre.shape[1]
    n = e * m
    row = np.empty(n, np.float32)
    bits = row.view(np.int32)
    sc = np.ones(e, np.float32)
    off = np.zeros(e, np.float32)
    bm, bk, bp, ck, ci = _scratch(n, L, k)
    for b in range(lo, hi):
        for s in range(e):
            r = rows[b, s]
            ws = w[b, s]
            ex = experts[b, s]
            base = ex * m
            # slices indexed from 0 (see `_key_bounds`): these loops vectorise
            out = row[s * m:(s + 1) * m]
            src = pre[r]
            bs = bias[base:base + m]
            if scaled:
                sc_s = scale[ex]
                off_s = offset[b, s]
                sc[s] = sc_s
                off[s] = off_s
                for j in range(m):
                    out[j] = ws * ((sc_s * src[j] + off_s) + bs[j])
            else:
                for j in range(m):
                    out[j] = ws * (src[j] + bs[j])
            if use_dead:
                dd = dead[base:base + m]
                for j in range(m):
                    if not dd[j]:
                        out[j] = -np.inf
        _select_row(row, bits, k, L, bm, bk, bp, ck, ci, out_v[b], out_i[b])
        for t in range(k):
            p = out_i[b, t]
            s = p // m
            f = experts[b, s] * m + p % m
            u = pre[rows[b, s], p % m]
            out_u[b, t] = u
            out_z[b, t] = (sc[s] * u + off[s]) + bias[f]
            out_f[b, t] = f
            out_s[b, t] = s


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


# Division and sqrt vectorise only with numpy's error model (python's checks each division
# for a zero divisor, one element at a time: 7.0 against 1.7 ms for one thread's pass over
# 4,608 × 576 rows of the optimiser's step below)
@njit(fastmath=_FLAGS, nogil=True, cache=True, error_model="numpy")
def _projected_sq_rows(lo, hi, G, W, out):
    """out[r] = ‖G[r] − ⟨G[r], W[r]⟩ · W[r]‖² for rows r in [lo, hi)."""
    d = G.shape[1]
    for r in range(lo, hi):
        g = G[r]
        w = W[r]
        a = np.float32(0.0)
        for c in range(d):
            a += g[c] * w[c]
        s = np.float32(0.0)
        for c in range(d):
            v = g[c] - a * w[c]
            s += v * v
        out[r] = s


@njit(fastmath=_FLAGS, nogil=True, cache=True, error_model="numpy")
def _adam_rows(lo, hi, W, G, M1, M2, step_size, bc2_sqrt, scale, beta1, beta2, rest1, rest2,
               eps, unit_eps, decoder):
    """A weight's optimiser step for rows [lo, hi), in place (what `kernels._adam_rows_kernel`
    computes on a GPU): the gradient projected onto the row's orthogonal complement (decoder)
    and divided by the clip's scale, torch's Adam update, the row put back to unit norm
    (decoder; a NaN norm stays NaN)."""
    d = W.shape[1]
    for r in range(lo, hi):
        w = W[r]
        g = G[r]
        m1 = M1[r]
        m2 = M2[r]
        a = np.float32(0.0)
        if decoder:
            for c in range(d):
                a += g[c] * w[c]
        for c in range(d):
            gc = ((g[c] - a * w[c]) if decoder else g[c]) / scale
            u = beta1 * m1[c] + rest1 * gc
            v = beta2 * m2[c] + rest2 * gc * gc
            m1[c] = u
            m2[c] = v
            w[c] = w[c] - step_size * u / (np.sqrt(v) / bc2_sqrt + eps)
        if decoder:
            s = np.float32(0.0)
            for c in range(d):
                s += w[c] * w[c]
            norm = np.sqrt(s)
            if norm == norm:
                norm = max(norm, unit_eps)
            for c in range(d):
                w[c] = w[c] / norm


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _decoder_grads_rows(lo, hi, starts, order, k, acts, g, W, dots, gW):
    """For decoder rows f in [lo, hi), over their picks p (sorted by row: order[starts[f]:
    starts[f + 1]], pick p of token p // k): dots[p] = ⟨g[p // k], W[f]⟩ and
    gW[f] = Σ_p acts[p] · g[p // k] — the values' and the decoder's gradients in one pass, each
    gathered row of g read once for both, four picks at a time."""
    d = W.shape[1]
    acc = np.empty(d, np.float32)
    for f in range(lo, hi):
        acc[:] = 0.0
        w = W[f]
        q = starts[f]
        end = starts[f + 1]
        while q + 4 <= end:
            p0, p1, p2, p3 = order[q], order[q + 1], order[q + 2], order[q + 3]
            g0, g1, g2, g3 = g[p0 // k], g[p1 // k], g[p2 // k], g[p3 // k]
            a0, a1, a2, a3 = acts[p0], acts[p1], acts[p2], acts[p3]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for c in range(d):
                wc = w[c]
                v0, v1, v2, v3 = g0[c], g1[c], g2[c], g3[c]
                s0 += v0 * wc
                s1 += v1 * wc
                s2 += v2 * wc
                s3 += v3 * wc
                acc[c] += (a0 * v0 + a1 * v1) + (a2 * v2 + a3 * v3)
            dots[p0], dots[p1], dots[p2], dots[p3] = s0, s1, s2, s3
            q += 4
        while q < end:
            p = order[q]
            gp = g[p // k]
            a = acts[p]
            s = np.float32(0.0)
            for c in range(d):
                s += gp[c] * w[c]
                acc[c] += a * gp[c]
            dots[p] = s
            q += 1
        gW[f, :] = acc


@njit(fastmath=_FLAGS, inline="always")
def _add_rows(acc, X, rows, w, lo, hi, order):
    """acc += Σ over q in [lo, hi) of w[q] · X[rows[q]] (w[order[q]] where `order` is not
    None: weights read in their unsorted places), four rows at a time."""
    d = X.shape[1]
    q = lo
    while q + 4 <= hi:
        x0, x1, x2, x3 = X[rows[q]], X[rows[q + 1]], X[rows[q + 2]], X[rows[q + 3]]
        if order is None:
            a0, a1, a2, a3 = w[q], w[q + 1], w[q + 2], w[q + 3]
        else:
            a0, a1, a2, a3 = w[order[q]], w[order[q + 1]], w[order[q + 2]], w[order[q + 3]]
        for c in range(d):
            acc[c] += (a0 * x0[c] + a1 * x1[c]) + (a2 * x2[c] + a3 * x3[c])
        q += 4
    while q < hi:
        xq = X[rows[q]]
        a = w[q] if order is None else w[order[q]]
        for c in range(d):
            acc[c] += a * xq[c]
        q += 1


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _segment_sum_rows(lo, hi, starts, tokens, w, order, x, init, group, out):
    """For rows f in [lo, hi): out[f] = Σ over sorted picks q in [starts[f], starts[f + 1]) of
    w[q] · x[tokens[q]] (w[order[q]] where `order` is not None) — a segmented weighted sum of
    gathered rows, accumulated in the output row, started from init[f // group] where `init`
    is not None, else from zero."""
    for f in range(lo, hi):
        acc = out[f]
        if init is None:
            acc[:] = 0.0
        else:
            acc[:] = init[f // group]
        _add_rows(acc, x, tokens, w, starts[f], starts[f + 1], order)


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _decode_rows(lo, hi, idx, acts, W, bias, out):
    """For tokens b in [lo, hi): out[b] = bias + Σ_j acts[b, j] · W[idx[b, j]]."""
    for b in range(lo, hi):
        acc = out[b]
        acc[:] = bias
        _add_rows(acc, W, idx[b], acts[b], 0, idx.shape[1], None)


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _centred_products_rows(lo, hi, x, c, W, out, x_c):
    """For tokens b in [lo, hi): x_c[b] = x[b] − c and out[b, n] = ⟨x_c[b], W[n]⟩ — four
    tokens against four rows of W at a time (sixteen sums, each row of x_c and of W read once
    for four of them), the rows of x_c read back from cache."""
    d = x.shape[1]
    N = W.shape[0]
    b = lo
    while b < hi:
        nt = min(4, hi - b)
        for t in range(nt):
            xb = x[b + t]
            ob = x_c[b + t]
            for j in range(d):
                ob[j] = xb[j] - c[j]
        if nt == 4:
            t0, t1, t2, t3 = x_c[b], x_c[b + 1], x_c[b + 2], x_c[b + 3]
            n = 0
            while n + 4 <= N:
                w0, w1, w2, w3 = W[n], W[n + 1], W[n + 2], W[n + 3]
                a00 = a01 = a02 = a03 = np.float32(0.0)
                a10 = a11 = a12 = a13 = np.float32(0.0)
                a20 = a21 = a22 = a23 = np.float32(0.0)
                a30 = a31 = a32 = a33 = np.float32(0.0)
                for j in range(d):
                    u0, u1, u2, u3 = t0[j], t1[j], t2[j], t3[j]
                    v0, v1, v2, v3 = w0[j], w1[j], w2[j], w3[j]
                    a00 += u0 * v0
                    a01 += u0 * v1
                    a02 += u0 * v2
                    a03 += u0 * v3
                    a10 += u1 * v0
                    a11 += u1 * v1
                    a12 += u1 * v2
                    a13 += u1 * v3
                    a20 += u2 * v0
                    a21 += u2 * v1
                    a22 += u2 * v2
                    a23 += u2 * v3
                    a30 += u3 * v0
                    a31 += u3 * v1
                    a32 += u3 * v2
                    a33 += u3 * v3
                out[b, n], out[b, n + 1], out[b, n + 2], out[b, n + 3] = a00, a01, a02, a03
                out[b + 1, n], out[b + 1, n + 1], out[b + 1, n + 2], out[b + 1, n + 3] = a10, a11, a12, a13
                out[b + 2, n], out[b + 2, n + 1], out[b + 2, n + 2], out[b + 2, n + 3] = a20, a21, a22, a23
                out[b + 3, n], out[b + 3, n + 1], out[b + 3, n + 2], out[b + 3, n + 3] = a30, a31, a32, a33
                n += 4
            first = n  # the rows of W left over: one at a time
        else:
            first = 0
        for t in range(nt):
            tb = x_c[b + t]
            for n in range(first if nt == 4 else 0, N):
                wn = W[n]
                a = np.float32(0.0)
                for j in range(d):
                    a += tb[j] * wn[j]
                out[b + t, n] = a
        b += nt


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _group_sums_rows(lo, hi, G, W, colsum, dots):
    """For experts i in [lo, hi) of G, W [N, m, d]: colsum[i] = Σ_j G[i, j] and
    dots[i] = Σ_j ⟨G[i, j], W[i, j]⟩, from one read of each."""
    m = G.shape[1]
    d = G.shape[2]
    for i in range(lo, hi):
        acc = colsum[i]
        acc[:] = 0.0
        s = np.float32(0.0)
        for j in range(m):
            g = G[i, j]
            w = W[i, j]
            for c in range(d):
                acc[c] += g[c]
                s += g[c] * w[c]
        dots[i] = s


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _sq_err_rows(lo, hi, a, b, block, err, colsum, sqsum):
    """For blocks of `block` rows i in [lo, hi) of a, b [B, d]: err[i] = Σ over the block's
    entries of (a − b)², colsum[i] = Σ of the block's rows of b and sqsum[i] = Σ of its
    squared entries, all in float64, from one read of each."""
    B = a.shape[0]
    d = a.shape[1]
    for i in range(lo, hi):
        acc = colsum[i]
        acc[:] = 0.0
        s = 0.0
        q = 0.0
        for r in range(i * block, min(B, (i + 1) * block)):
            ar = a[r]
            br = b[r]
            for c in range(d):
                u = np.float64(br[c])
                v = np.float64(ar[c]) - u
                s += v * v
                acc[c] += u
                q += u * u
        err[i] = s
        sqsum[i] = q


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _scaled_diff_rows(lo, hi, a, b, scale, out):
    """out[r] = scale · (a[r] − b[r]) for rows r in [lo, hi)."""
    d = a.shape[1]
    for r in range(lo, hi):
        ar = a[r]
        br = b[r]
        o = out[r]
        for c in range(d):
            o[c] = scale * (ar[c] - br[c])


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _scaled_diff_sum_rows(lo, hi, a, b, scale, block, out, colsum):
    """For blocks of `block` rows i in [lo, hi): out[r] = scale · (a[r] − b[r]) for the block's
    rows r, and colsum[i] = Σ of those rows of out (float32 over at most `block` rows)."""
    R = a.shape[0]
    d = a.shape[1]
    for i in range(lo, hi):
        cs = colsum[i]
        cs[:] = 0.0
        for r in range(i * block, min(R, (i + 1) * block)):
            ar = a[r]
            br = b[r]
            o = out[r]
            for c in range(d):
                v = scale * (ar[c] - br[c])
                o[c] = v
                cs[c] += v


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _expert_sum_rows(lo, hi, x, experts, r, block, acc):
    """For blocks of `block` rows i in [lo, hi) of x [B, d]: acc[i, n] = Σ over the block's
    rows b and slots s with experts[b, s] = n of r[b, s] · x[b]."""
    B = x.shape[0]
    e = experts.shape[1]
    for i in range(lo, hi):
        a = acc[i]
        a[:] = 0.0
        for b in range(i * block, min(B, (i + 1) * block)):
            row = x[b]
            for s in range(e):
                an = a[experts[b, s]]
                rs = r[b, s]
                for c in range(row.shape[0]):
                    an[c] += rs * row[c]


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _centre_rows(lo, hi, x, centre, experts, shift, out, offset):
    """For rows b in [lo, hi): out[b] = x[b] − centre and offset[b, s] = ⟨shift[experts[b, s]],
    out[b]⟩ for each slot s: the first two slots' dot products in the pass that writes the row
    (a pass of their own over the row in cache measured ~0.1–0.3 ms slower at 4,096 × 576,
    e = 2), any further slots' from the row in cache."""
    d = x.shape[1]
    e = experts.shape[1]
    for b in range(lo, hi):
        s0 = shift[experts[b, 0]]
        s1 = shift[experts[b, 1 if e > 1 else 0]]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        for c in range(d):
            v = x[b, c] - centre[c]
            out[b, c] = v
            a0 += v * s0[c]
            a1 += v * s1[c]
        offset[b, 0] = a0
        if e > 1:
            offset[b, 1] = a1
        for s in range(2, e):
            sh = shift[experts[b, s]]
            a = np.float32(0.0)
            for c in range(d):
                a += out[b, c] * sh[c]
            offset[b, s] = a


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _pick_scale_rows(lo, hi, g, slot, experts, u, scale, g_rows, r, r_u):
    """For tokens b in [lo, hi), over their picks j (from slot s = slot[b, j] of expert
    experts[b, s]): g_rows[b, j] = g[b, j] · scale[expert]; r[b, s] = Σ_j g[b, j] and
    r_u[b, s] = Σ_j g[b, j] · u[b, j] over the slot's picks."""
    k = g.shape[1]
    e = r.shape[1]
    for b in range(lo, hi):
        for s in range(e):
            r[b, s] = 0.0
            r_u[b, s] = 0.0
        for j in range(k):
            s = slot[b, j]
            gj = g[b, j]
            g_rows[b, j] = gj * scale[experts[b, s]]
            r[b, s] += gj
            r_u[b, s] += gj * u[b, j]
