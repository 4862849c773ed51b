"""Routing, expert encoding and the global TopK of the SAEs (METHOD.md §1–3).

Only the selected experts are computed: (token, expert) pairs are grouped by expert and each
expert's encoder block multiplies just its own tokens, so the encoder costs ~e/N of a dense
SAE of the same width. A dense TopK SAE is the one-expert case (N = e = 1, w = 1).

Each step exists twice, under the same name, and the tests hold the fast one to the plain one:

| plain reference                  | fast path                                             |
|----------------------------------|-------------------------------------------------------|
| `router_logits`: (x − b) · Wᵀ with autograd | `router_logits_fused`: the same forward; the centre's gradient as one [N] × [N, d] product |
| `grouped_expert_encode`: a Python loop of one matmul per expert, group sizes read on the host | `grouped_expert_encode_gmm`: one grouped GEMM (`torch._grouped_mm`, CUTLASS on Hopper in bf16), group offsets computed on the device — no loop, no host synchronisation |
| `topk_encode`: ReLU, weighting and TopK with ordinary autograd, so the backward pass is dense over all computed candidates | `topk_encode_sparse`: the same codes from one autograd Function whose backward touches only the k selected latents (and the AuxK picks), as EleutherAI sparsify's fused encoder does; its ReLU runs on the picks, after the TopK, and the TopK runs in two stages where `TOPK_SLICE` says so (`topk_candidates`); on the CPU in float32, numba's kernels (engine/sae/cpu_kernels.py), a routed SAE's expert encode fused with its TopK (`_expert_picks_cpu`); on CUDA a routed SAE's TopK as the Triton `row_topk` |
| `decode_picks`: `embedding_bag` over each token's picks (+ b_dec), with the bag's own backward | `decode_picks_sddmm`: the same forward (on the CPU numba's `decode_rows`, each row started from b_dec); the values' gradient as one sampled dense-dense product (the bag's own kernel for it), the decoder's as the encoder's segmented sum (float32 weights on the CPU and CUDA; `picks_decoder`), the picks sorted by feature once for both (`FeatureGroups`) |

Feature Scaling has its pair in engine/sae/scale.py (`ScaleSAE.scaled_encoder`: METHOD §3
written out with autograd, or `_FeatureScaling`, one fused multiply-add with its own backward).
On the CPU's path (`folds_scaling`) the fast encode takes it folded in instead: Ŵ_i x =
s_i · (W_i x) + ⟨c_i, x⟩ per candidate, Ŵ never written out (`topk_encode_sparse`'s
`scaling`).

`expert_encoder(device, dtype)` picks the expert encode: the grouped GEMM where it runs
without a host synchronisation (CUDA, bf16, compute capability 9 or 10), else the loop, which
measured as fast on the CPU (benchmarks/bench_gpu.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels, kernels

GMM_ALIGN = 16
"""Rows per expert group are padded to a multiple of this for the CUDA grouped GEMM."""


class TopKCodes(NamedTuple):
    top_acts: Tensor
    """[B, k] the selected values z (≥ 0)."""
    top_indices: Tensor
    """[B, k] their global feature indices."""
    aux_acts: Tensor | None
    """[B, k_aux] the largest values among dead features (AuxK), when asked."""
    aux_indices: Tensor | None
    """[B, k_aux] their feature indices."""


# -- routing ----------------------------------------------------------------------------------
def route_topk(probs: Tensor, e: int, weighting: str,
               fast: bool = False) -> tuple[Tensor, Tensor]:
    """Pick the e most probable experts and their weights (METHOD §3, Multiple Expert Activation).

    `softmax`: w_i = softmax over the *selected probabilities* (not the logits), which gives
    weights near 1/e. `binary`: w_i = 1 for every selected expert (the 0/1 ablation). The
    experts come largest first (the top-1 in column 0). With `fast`, where `kernels.use` says so
    they are found by the Triton `top_experts` (one kernel) and their probabilities gathered,
    else by `torch.topk`.
    """
    if fast and kernels.use_fused(probs) and kernels.top_experts_takes(probs, e):
        top_i = kernels.top_experts(probs.detach(), e)
        top_p = probs.gather(1, top_i)
    else:
        top_p, top_i = probs.topk(e, dim=-1)
    if weighting == "softmax":
        w = torch.softmax(top_p, dim=-1)
    else:
        w = torch.ones_like(top_p)
    return top_i, w


def router_logits(x: Tensor, centre: Tensor, W: Tensor) -> Tensor:
    """The plain reference: the router's (x − centre) · Wᵀ [B, N], with autograd."""
    return (x - centre) @ W.T


class _CentredLinear(torch.autograd.Function):
    """(x − c) · Wᵀ whose backward gives c its gradient as −(Σ_b g_b) · W, one [N] × [N, d]
    product, where autograd forms g · W [B, d], negates it and sums it over the tokens
    (11.6 → 7.3 ms forward and backward at B 4,096, d 576, N 16 on the CPU). W's gradient is
    one product in the forward's dtype, as autocast's own backward computes it (under bf16
    autocast a bf16 GEMM, where a float32 one ran as a SIMT kernel: 0.034 ms of a 2.35 ms
    Scale step on an H100)."""

    @staticmethod
    def forward(ctx, x, c, W):
        if (x.dim() == 2 and cpu_kernels.use(x) and c.dtype == W.dtype == torch.float32
                and products_dtype(x) == torch.float32):  # x − c and the logits from one read
            out, x_c = cpu_kernels.centred_products(x, c, W)
        elif _rounds_centred(x, c, products_dtype(x)):  # x − c written once, in bf16
            x_c = kernels.centred_rows(x, c, products_dtype(x))
            out = x_c @ W.to(x_c.dtype).T
        else:
            x_c = x - c
            out = x_c @ W.T  # bf16 under autocast, as the reference
        ctx.save_for_backward(x_c, W)
        ctx.dtypes = (x.dtype, c.dtype)
        ctx.compute = out.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x_c, W = ctx.saved_tensors
        g = g.float()
        g_rows = g.reshape(-1, W.shape[0])  # any leading shape: the tokens are its rows
        grad_x = grad_c = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ W.float()).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_c = -(g_rows.sum(0) @ W.float()).to(ctx.dtypes[1])
        if ctx.needs_input_grad[2]:
            x_rows = x_c.reshape(-1, W.shape[1]).to(ctx.compute)
            if x_c.device.type == "cpu":  # MKL: x_cᵀ · g [d, N], 1.0 against 1.8 ms for gᵀ · x_c
                grad_W = (x_rows.T @ g_rows.to(ctx.compute)).T.to(W.dtype)
            else:
                grad_W = (g_rows.T.to(ctx.compute) @ x_rows).to(W.dtype)
        return grad_x, grad_c, grad_W


ROUND_CENTRED_ROWS = True
"""Where the Triton kernels run and the products are half precision, x − centre (the router's
and the encoder's) is written once in the products' dtype by `kernels.centred_rows` (what
autocast's cast of the float32 difference gives, bit for bit) where PyTorch wrote the float32
difference and then cast it (the router's cast twice: forward and backward). A switch for
`benchmarks/profile_gpu.py --parts fusions`' A/B."""


def _rounds_centred(x: Tensor, centre: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether x − centre is formed by `kernels.centred_rows` in `dtype` (`ROUND_CENTRED_ROWS`):
    float32 rows and centre, a half-precision dtype and the Triton kernels running. (x's own
    gradient never reads x − centre, so only its rows in `dtype` need keeping.)"""
    return (ROUND_CENTRED_ROWS and centre is not None and x.dim() == 2
            and x.dtype == centre.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
            and kernels.use_fused(x))


def router_logits_fused(x: Tensor, centre: Tensor, W: Tensor) -> Tensor:
    """`router_logits` with the backward of `_CentredLinear`."""
    return _CentredLinear.apply(x, centre, W)


def expert_counts(expert_idx: Tensor, N: int) -> Tensor:
    """[N] how many entries of `expert_idx` name each expert, computed on the device
    (`bincount` reads its output size on the host)."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(N, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


# -- expert encode: W[i] x + b[i] for each (token, expert) pair ------------------------------
def grouped_expert_encode(
    x_c: Tensor, token_idx: Tensor, expert_idx: Tensor, W: Tensor, b: Tensor
) -> Tensor:
    """The pre-activations W[i] x + b[i] for each (token, expert) pair, computing only those
    pairs (the ReLU is the caller's: the fast TopK applies it to its picks alone).

    Pairs are sorted by expert and each expert's block is one matmul over just its tokens,
    so the cost is (pairs × m × d), i.e. ~e/N of a dense SAE of the same width.
    x_c [B, d], token_idx/expert_idx [P], W [N, m, d], b [N, m] → [P, m] in pair order.
    """
    N, m, _ = W.shape
    order, groups = _expert_groups(token_idx, expert_idx, N)
    # unbind: one autograd node for all experts, rather than a full-size zero gradient per
    # expert slice (which would cost N × M·d writes per backward pass).
    W_i, b_i = W.unbind(0), b.unbind(0)
    blocks = [F.linear(x_c.index_select(0, tokens), W_i[i], b_i[i]) for i, _, tokens in groups]
    if not blocks:
        return x_c.new_zeros(0, m)
    return torch.cat(blocks, 0).index_select(0, _inverse(order))


def _expert_groups(token_idx: Tensor, expert_idx: Tensor, N: int):
    """The (token, expert) pairs grouped by expert for a loop of one matmul per expert:
    (order, the pairs sorted stably by expert; [(expert i, its first sorted pair, its pairs'
    tokens)] for each expert with pairs). The group sizes are read on the host — the loop's
    host synchronisation."""
    order = torch.argsort(_narrow_keys(expert_idx, N), stable=True)
    counts = torch.bincount(expert_idx, minlength=N).tolist()
    sorted_tokens = token_idx[order]
    groups, start = [], 0
    for i, c in enumerate(counts):
        if c:
            groups.append((i, start, sorted_tokens[start:start + c]))
            start += c
    return order, groups


def _narrow_keys(idx: Tensor, n: int) -> Tensor:
    """idx (values in [0, n)) in the narrowest integer type that holds them, for a radix sort:
    a pass per byte of key (on an H100, 64-bit keys took 8 passes where 32-bit ones took 4);
    experts fit a byte, the paper's 24,576 features two."""
    if n <= 2**8:
        return idx.to(torch.uint8)
    if n <= 2**15:
        return idx.to(torch.int16)
    return idx.int() if n <= 2**31 else idx


def _inverse(order: Tensor) -> Tensor:
    """The inverse permutation: position of each original pair in the sorted order."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def grouped_expert_encode_gmm(
    x_c: Tensor, token_idx: Tensor, expert_idx: Tensor, W: Tensor, b: Tensor,
    align: int = GMM_ALIGN,
) -> Tensor:
    """The same as `grouped_expert_encode`, as one grouped GEMM with no host synchronisation.

    Pairs are sorted by expert into a buffer whose groups start at multiples of `align` rows
    (the CUDA kernel's alignment); its size, P + N·(align − 1) rows, is fixed in advance, so
    nothing about the routing has to be read on the host. Rows past a group's end are zeros
    in, and ignored out.
    """
    m = W.shape[1]
    P = expert_idx.numel()
    # Without autograd (the sparse TopK's forward) the padding rows may hold anything: their
    # outputs are never read. With it they must be zeros, or W's gradient would read them.
    differentiable = torch.is_grad_enabled() and (x_c.requires_grad or W.requires_grad
                                                  or b.requires_grad)
    out, dest, order, e_sorted = _gmm_products(x_c, token_idx, expert_idx, W, align, differentiable)
    if not differentiable and kernels.use(out):  # the epilogue below as one Triton pass
        return kernels.expert_rows(out, dest, order, e_sorted, b, x_c.dtype)
    # the bias added in float32 (its gradient then sums each expert's rows in float32, as the
    # loop's GEMM does, instead of one bf16 rounding per row)
    pre_sorted = (out[dest].float() + b.float()[e_sorted]).to(x_c.dtype)
    return pre_sorted.new_empty(P, m).index_copy(0, order, pre_sorted)


FUSED_EXPERT_PLAN = True
"""Where the Triton kernels run, the grouped GEMM's layout from `kernels.expert_plan` (a
counting sort in two kernels) and its buffer filled by `kernels.pack_rows`, instead of a radix
sort by expert, a dozen small passes for the rows and a gather and `index_copy_`. A switch for
`benchmarks/profile_gpu.py --parts fusions`' A/B."""


def _gmm_products(x_c: Tensor, token_idx: Tensor, expert_idx: Tensor, W: Tensor, align: int,
                  zero_padding: bool):
    """The grouped GEMM of `grouped_expert_encode_gmm` before its epilogue: (out, the products
    W_i x of pair order[q] at row dest[q]; dest; order, the pairs sorted stably by expert — or
    any order, the identity with `FUSED_EXPERT_PLAN`: each q names a pair, its row and, in
    e_sorted, its expert). The padding rows are zeros with `zero_padding`, else anything."""
    N = W.shape[0]
    P = expert_idx.numel()
    buf = (x_c.new_zeros if zero_padding else x_c.new_empty)(P + N * (align - 1), x_c.shape[1])
    if (FUSED_EXPERT_PLAN and kernels.use_fused(x_c) and kernels.expert_plan_takes(P, N)
            and not (torch.is_grad_enabled() and x_c.requires_grad)):  # the copy has no autograd
        # each pair's buffer row from a counting sort in two kernels, its row copied there in
        # one: the same layout as below, the pairs left in pair order (order = identity)
        dest, ends = kernels.expert_plan(expert_idx, N, align)
        kernels.pack_rows(x_c, token_idx, dest, buf)
        order, e_sorted = torch.arange(P, device=x_c.device), expert_idx.reshape(-1)
    else:
        order = torch.argsort(_narrow_keys(expert_idx, N), stable=True)
        e_sorted = expert_idx[order]
        counts = expert_counts(expert_idx, N)
        padded = (counts + align - 1) // align * align
        ends = torch.cumsum(padded, 0).to(torch.int32)
        rank = torch.arange(P, device=x_c.device) - (torch.cumsum(counts, 0) - counts)[e_sorted]
        dest = (ends - padded)[e_sorted] + rank  # row of each sorted pair in the buffer
        buf.index_copy_(0, dest, x_c[token_idx[order]])
    # W.transpose(1, 2) is [N, d, m] in column-major layout, as the grouped GEMM wants it
    out = torch._grouped_mm(buf, W.transpose(1, 2), offs=ends)
    return out, dest, order, e_sorted


class ScaledProducts(NamedTuple):
    """The expert encode with Feature Scaling folded in (`scaled_expert_encode`)."""

    pre: Tensor
    """[P, m] scale_i · (W_i x) + offset + b_i of each (token, expert i) pair, in pair order."""
    products: Tensor
    """The products W_i x, pair p's at row `rows[p]`."""
    rows: Tensor
    """[P] the row of `products` holding each pair's."""


def scaled_expert_encode(x_c: Tensor, token_idx: Tensor, expert_idx: Tensor, W: Tensor, b: Tensor,
                         scale: Tensor, offset: Tensor, encode: ExpertEncode) -> ScaledProducts:
    """Without autograd (the sparse TopK's forward): each pair's pre-activations with Feature
    Scaling folded in (METHOD §3: Ŵ_i = scale_i · W_i + shift_i, so Ŵ_i x + b_i = scale_i ·
    (W_i x) + ⟨shift_i, x⟩ + b_i, with offset [P] each pair's ⟨shift_i, x⟩), Ŵ never written
    out; scale, offset and b added in float32 and rounded once to x_c's dtype. The grouped
    GEMM's products stay where it wrote them (the backward reads the picks' W_i x there); on
    CUDA its epilogue is the Triton `expert_rows` with the scale and offset applied."""
    P, m = expert_idx.numel(), W.shape[1]
    if encode is grouped_expert_encode_gmm:
        out, dest, order, e_sorted = _gmm_products(x_c, token_idx, expert_idx, W, GMM_ALIGN, False)
        if kernels.use(out):
            pre = kernels.expert_rows(out, dest, order, e_sorted, b, x_c.dtype, scale, offset)
        else:
            pre_sorted = (out[dest].float() * scale.float()[e_sorted, None]
                          + offset.float()[order, None] + b.float()[e_sorted]).to(x_c.dtype)
            pre = pre_sorted.new_empty(P, m).index_copy(0, order, pre_sorted)
        return ScaledProducts(pre, out, torch.empty_like(dest).index_copy_(0, order, dest))
    u = encode(x_c, token_idx, expert_idx, W, torch.zeros_like(b))
    pre = (u.float() * scale.float()[expert_idx, None] + offset.float()[:, None]
           + b.float()[expert_idx]).to(x_c.dtype)
    return ScaledProducts(pre, u, torch.arange(P, device=u.device))


ExpertEncode = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def products_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's products run in: autocast's where it is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def expert_encoder(device: torch.device, dtype: torch.dtype) -> ExpertEncode:
    """The expert encode for computing in `dtype` on `device` (see the module docstring)."""
    if (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10)):
        return grouped_expert_encode_gmm
    return grouped_expert_encode


# -- candidates → global TopK (+ AuxK) ------------------------------------------------------
def _preactivations(x_c, W, b, experts, encode: ExpertEncode) -> Tensor:
    """[B, e·m] W_i x_c + b_i over each token's experts, concatenated (dense: every feature, in
    order). Candidate p of a token is feature `_feature_index(p)`."""
    N, m, _ = W.shape
    if experts is None:  # dense: every feature is a candidate
        return F.linear(x_c, W.reshape(N * m, -1), b.reshape(-1))
    B, e = experts.shape
    tokens = torch.arange(B, device=x_c.device).repeat_interleave(e)
    return encode(x_c, tokens, experts.reshape(-1), W, b).view(B, e * m)


def _weighted(v: Tensor, weights: Tensor | None) -> Tensor:
    """[B, e·m]: each expert's m candidates times the token's weight for that expert."""
    if weights is None:
        return v
    B, e = weights.shape
    return (v.view(B, e, -1) * weights[:, :, None]).reshape(B, -1)


def _candidates(x_c, W, b, experts, weights, encode: ExpertEncode):
    """f [B, e·m] = concat_i w_i · z_i over the token's experts, and z = ReLU(W_i x_c + b_i)
    [B, e·m] before weighting (METHOD §3)."""
    z = F.relu(_preactivations(x_c, W, b, experts, encode))
    return _weighted(z, weights), z


TOPK_SLICE: dict[str, int] = {}
"""Candidates per slice of the two-stage TopK (`topk_chunked`) by device type; a device type
not listed takes one `torch.topk` over all candidates. Empty: on the CPU the two-stage form
measured no faster (a single pass over each token's candidates is what the CPU's TopK already
is); on a GPU see `benchmarks/profile_gpu.py --parts topk`."""


def topk_chunked(f: Tensor, k: int, chunks: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of f [B, n] and their positions, in two stages: the k largest
    of each of `chunks` equal slices, then the k largest of those chunks·k. Exact: a row's k
    largest are each among the k largest of their own slice. With ties at the k-th value any
    of the tied positions may be returned, as with `torch.topk`. Unsorted, as the callers ask."""
    B, n = f.shape
    c = n // chunks
    vals, pos = f.view(B, chunks, c).topk(k, dim=-1, sorted=False)  # [B, chunks, k]
    pos = pos + torch.arange(0, n, c, device=f.device).view(1, chunks, 1)
    top, which = vals.view(B, chunks * k).topk(k, dim=-1, sorted=False)
    return top, pos.view(B, chunks * k).gather(1, which)


def topk_candidates(f: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`f.topk(k, dim=-1, sorted=False)`: the numba kernel where `cpu_kernels.use` says so
    (float32 on the CPU: 2.3 vs 10.8 ms for Scale e=2's 576 candidates a token, 10.8 vs 29.5
    ms for dense TopK's 4,608, 4,096 tokens, k 32); the Triton `row_topk` where `kernels.use`
    says so and a row fits a program (a routed SAE's e·m candidates, not dense TopK's M); in
    two stages where `TOPK_SLICE` names the device and the candidates split into at least two
    slices of that many, each at least k."""
    n = f.shape[-1]
    if cpu_kernels.use(f) and f.dim() == 2 and 0 < k <= n:
        return cpu_kernels.topk(f, k)
    if kernels.use(f) and kernels.row_topk_takes(f, k):
        return kernels.row_topk(f, k)
    width = TOPK_SLICE.get(f.device.type, 0)
    if width >= k and f.dim() == 2 and n % width == 0 and n // width > 1:
        return topk_chunked(f, k, n // width)
    return f.topk(k, dim=-1, sorted=False)


def _feature_index(pos: Tensor, experts: Tensor | None, m: int) -> Tensor:
    """Global feature index of candidate positions `pos` [B, j]: position p of a token is
    row p % m of its (p // m)-th expert (dense: feature p)."""
    if experts is None:
        return pos
    return experts.gather(1, pos // m) * m + pos % m


def _dead_candidates(dead: Tensor, experts: Tensor | None, m: int, f: Tensor) -> Tensor:
    """[B, e·m] whether each candidate of each token is a dead feature."""
    if experts is None:
        return dead.expand_as(f)
    return dead.view(-1, m)[experts].reshape(f.shape)  # each token's experts' rows of the mask


def topk_encode(
    x: Tensor, centre: Tensor | None, W: Tensor, b: Tensor, k: int,
    experts: Tensor | None = None, weights: Tensor | None = None, dead: Tensor | None = None,
    k_aux: int = 0, encode: ExpertEncode = grouped_expert_encode,
) -> TopKCodes:
    """The plain reference. x_c = x − centre (b_dec; x itself when None); z_i = ReLU(W_i x_c
    + b_i) for each expert i of the token (all of W when `experts` is None); f = concat_i w_i ·
    z_i; codes = TopK_k(f). With a `dead` mask [M], also the k_aux largest f among dead
    features (AuxK).

    x [B, d], centre [d], W [N, m, d], b [N, m], experts/weights [B, e].
    """
    m = W.shape[1]
    x_c = x if centre is None else x - centre
    f, _ = _candidates(x_c, W, b, experts, weights, encode)
    top_acts, pos = f.topk(k, dim=-1, sorted=False)
    top_indices = _feature_index(pos, experts, m)
    aux_acts = aux_indices = None
    if dead is not None and k_aux > 0:
        is_dead = _dead_candidates(dead, experts, m, f)
        masked = torch.where(is_dead, f, torch.zeros_like(f))
        n = min(k_aux, int(is_dead.sum(-1).max()))  # host sync: the plain reference
        if n > 0:
            aux_acts, apos = masked.topk(n, dim=-1, sorted=False)
            aux_indices = _feature_index(apos, experts, m)
    return TopKCodes(top_acts, top_indices, aux_acts, aux_indices)


CUDA_SCALING = "sums"
"""How a Scale SAE's Feature Scaling (Ŵ_i = s_i · W_i + c_i, METHOD §3) runs on CUDA:

- "formed": Ŵ formed first with autograd (`scale._FeatureScaling`: two Triton passes over
  [N, m, d] forward — Ŵ in float32, then autocast's copy in bf16 — and `group_sums` and a pass
  over W's gradient backward).
- "epilogue": folded into the encode (`scaled_expert_encode`: s_i · (W_i x) + ⟨c_i, x⟩ in the
  grouped GEMM's Triton epilogue, the backward's per-pick and per-expert sums in PyTorch). On an
  H100 at the paper's size (2026-11-27, bf16, recorded step, `benchmarks/profile_gpu.py --parts
  fusions`) 1.871 ms a step against 1.801 for "formed" — its float32 [N, B] × [B, d] product
  for the shifts' gradient, the scatter-adds and the broadcast add of the means' gradient into
  W's cost more than the passes they replace (without Feature Scaling: 1.589 ms).
- "sums": Ŵ written once, straight in the products' dtype, by the encode (`scaled_weights`),
  and the backward folded into the encoder's segmented sum (`scaled_scatter_rows`: W's
  gradient as s_i · Σ + the means' share, s_i's from each row's dot product with W in the same
  pass), the shifts' gradient one [N, B] × [B, d] product in the products' dtype accumulated in
  float32 (`expert_sums`); no pass over [N, m, d] but the one forming Ŵ."""

FUSED_PICK_GRADS = True
"""Where the Triton kernels run, a routed SAE's backward over its picks (each pick's
∂loss/∂pre, the expert weights' gradient and, with Feature Scaling as "sums", each token's
sums per expert) from one pass (`kernels.pick_grads`) instead of a gather, a where and three
scatter-adds into zeroed tensors. A switch for `benchmarks/profile_gpu.py --parts fusions`'
A/B."""

FUSED_PICKS = True
"""Where the Triton kernels run and AuxK adds no picks, what the sparse TopK keeps of its picks
(features, slots, z and the codes) from one pass (`kernels.picks`) instead of a gather, two
ReLUs, two casts and five index passes. A switch for `benchmarks/profile_gpu.py --parts
fusions`' A/B."""

CENTRE_GRAD_FROM_PRODUCTS = True
"""Where the encoder's gradient reads the rows in the products' dtype (`ENCODER_ROWS_IN_COMPUTE_DTYPE`
and the Triton kernels), the centre's gradient −∂b · W is one product with the half-precision
weights the forward's products read (Ŵ itself where Feature Scaling runs as "sums"),
accumulated in float32, instead of a float32 product with the master weights (and, with
Feature Scaling folded in, two more terms). A switch for `benchmarks/profile_gpu.py --parts
fusions`' A/B."""

ENCODER_ROWS_IN_COMPUTE_DTYPE = True
"""Where the Triton kernels run, the encoder's weight gradient sums the rows of x − centre in
the products' dtype (bf16 under autocast: half the bytes gathered, and the rows autocast's own
backward of the products would read), accumulated in float32; else in float32. A switch for
`benchmarks/profile_gpu.py --parts fold`'s A/B."""


class _SparseTopK(torch.autograd.Function):
    """Forward: `topk_encode` without autograd. Backward: only the selected latents (the k
    TopK picks and the AuxK picks) receive gradients — the candidates that lost the TopK
    contribute nothing to the loss, so their dense gradient would be zeros (sparsify's
    fused encoder makes the same observation).

    The ReLU runs on the picks after the TopK, not on all the candidates: ReLU is monotone and
    each expert weight w_i is positive (a softmax, or 1), so w_i · ReLU(p) = ReLU(w_i · p) and
    the TopK of the weighted pre-activations, clamped at zero, has the reference's values. Only
    where a token has fewer than k positive candidates do its zero picks name other features
    (the largest negative pre-activations rather than any of ReLU's zeros); a zero pick adds
    nothing to the reconstruction, receives no gradient and is not a firing. On the CPU this
    saves dense TopK's pass over its [B, M] candidates (~9 ms of a ~240 ms encode at B 4,096,
    M 4,608).

    The centre (b_dec) is an input of its own: its gradient, −Σ_tokens Σ_picks g_pre · W[pick],
    regroups by feature as −(Σ_picks-of-f g_pre) · W[f] = −∂b · W, one [M] × [M, d] product
    instead of a [B, d] gradient of x_c gathered from B·k rows and summed. The input x gets
    its gradient only when it asks for one (training batches never do)."""

    @staticmethod
    def forward(ctx, x, centre, W, b, weights, experts, dead, k, k_aux, encode, compute_dtype,
                scale, shift, mean_grad):
        N, m, d = W.shape
        u_all = scaling = None
        # x − centre's promoted dtype: the codes' and the gradients'
        x_dtype = x.dtype if centre is None else torch.promote_types(x.dtype, centre.dtype)
        with torch.no_grad():
            cpu_picks = compute_dtype == x.dtype and _picks_on_cpu(x, experts, encode)
            if scale is not None and cpu_picks:  # folded Feature Scaling on the CPU's path:
                # x − centre and each pair's ⟨shift_i, x − centre⟩ from one read of x
                x_c, offset = cpu_kernels.centre_rows(
                    x, centre if centre is not None else x.new_zeros(d), experts, shift)
                scaling = cpu_kernels.Scaling(scale.float(), offset)
            elif (_rounds_centred(x, centre, compute_dtype) and ENCODER_ROWS_IN_COMPUTE_DTYPE
                  and (scale is None or CUDA_SCALING == "sums")):
                # x − centre written once, in the products' dtype (the backward reads its rows
                # in that dtype, `x_rows`, and nothing reads it in float32)
                x_c = kernels.centred_rows(x, centre, compute_dtype)
            else:
                x_c = x if centre is None else x - centre
            # Feature Scaling folded in with Ŵ written once in the products' dtype ("sums")
            in_sums = scale is not None and not cpu_picks and CUDA_SCALING == "sums"
            xc, bc = x_c.to(compute_dtype), b.to(compute_dtype)
            Wc = (scaled_weights(W, scale, shift, compute_dtype) if in_sums
                  else W.to(compute_dtype))
            wc = weights.to(compute_dtype) if weights is not None else None
            # ReLU commutes with the TopK (it is monotone, and w_i > 0 gives w_i · ReLU(p) =
            # ReLU(w_i · p)), so it runs on the k picks, not on all the candidates: the same
            # values, and where fewer than k candidates are positive, zero picks either way
            if cpu_picks:  # features and slots from the kernel
                outs, idx_all, slot, z_all, u_all = _expert_picks_cpu(xc, Wc, bc, experts, wc, k,
                                                                      dead, k_aux, scaling)
            else:
                if scale is not None and not in_sums:  # folded into the GEMM's epilogue (CUDA)
                    B, e = experts.shape
                    # each pair's ⟨shift_i, x − centre⟩: [B, d] × [d, N], then the token's experts
                    offset = torch.mm(xc, shift.to(compute_dtype).T).gather(1, experts)
                    scaled = scaled_expert_encode(
                        xc, torch.arange(B, device=x.device).repeat_interleave(e),
                        experts.reshape(-1), Wc, bc, scale, offset.reshape(-1), encode)
                    pre = scaled.pre.view(B, e * m)
                else:
                    pre = _preactivations(xc, Wc, bc, experts, encode)
                f_pre = _weighted(pre, wc)
                top_f, pos = topk_candidates(f_pre, k)
                picks = [pos]
                one_pass = (FUSED_PICKS and (dead is None or k_aux == 0) and kernels.use_fused(pre)
                            and (scale is None or in_sums))
                outs = [top_f if one_pass else top_f.relu_()]
                if dead is not None and k_aux > 0:
                    is_dead = _dead_candidates(dead, experts, m, f_pre)
                    masked = f_pre.masked_fill(~is_dead, float("-inf"))
                    if f_pre.device.type == "cpu":  # no device to wait for: as many picks as can be dead
                        k_aux = max(1, min(k_aux, int(is_dead.sum(-1).max())))
                    aux_f, apos = topk_candidates(masked, k_aux)
                    picks.append(apos)
                    outs.append(aux_f.relu_())
                if one_pass:  # features, slots, z and the codes from one pass over the picks
                    idx_all, slot, z_all, codes = kernels.picks(pos, top_f, pre, experts, m,
                                                                x_dtype)
                    outs = [codes]
                else:  # z of each pick before weighting
                    z_all = pre.gather(1, torch.cat(picks, 1)).relu_()
                    pos_all = torch.cat(picks, 1)
                    idx_all = _feature_index(pos_all, experts, m)
                    slot = pos_all // m if experts is not None else None
                if scale is not None and not in_sums:  # the picks' W_i x, where the encode left them
                    pair = torch.arange(B, device=x.device)[:, None] * e + slot
                    u_all = scaled.products[scaled.rows[pair], pos_all % m].float()
            # 0 where an AuxK pick is not dead (masked out)
            if len(outs) > 1:
                z_all[:, k:] = torch.where(outs[1] > 0, z_all[:, k:], torch.zeros_like(outs[1]))
        # the rows W's gradient sums: where the Triton kernels run, x − centre as the products
        # read it (bf16 under autocast, as autocast's own backward of the products reads it)
        x_rows = xc if ENCODER_ROWS_IN_COMPUTE_DTYPE and kernels.use(xc) else None
        # and the centre's gradient, −∂b · W, from the weights the products read (Ŵ in bf16
        # where "sums" wrote it), as autocast's own backward of the products reads them
        W_products = (Wc if CENTRE_GRAD_FROM_PRODUCTS and x_rows is not None
                      and Wc.dtype != W.dtype and (scale is None or in_sums) else None)
        ctx.save_for_backward(x_c, W, idx_all, z_all.float(), slot, weights, experts, scale,
                              shift, u_all if scale is not None else None, x_rows, W_products)
        ctx.k = k
        ctx.mean_grad = mean_grad
        ctx.in_sums = in_sums
        ctx.x_dtype = x_dtype
        ctx.mark_non_differentiable(idx_all)
        top_idx = idx_all[:, :k]
        ctx.shared = top_idx._feature_groups = FeatureGroups()  # for the decoder's backward
        aux_idx = idx_all[:, k:] if len(outs) > 1 else None
        aux = outs[1].to(x_dtype) if len(outs) > 1 else None
        return outs[0].to(x_dtype), top_idx, aux, aux_idx

    @staticmethod
    def backward(ctx, g_top, _g_idx, g_aux, _g_aux_idx):
        x_c, W, idx, z, slot, weights, experts, scale, shift, u, x_rows, W_products = ctx.saved_tensors
        N, m, d = W.shape
        g = g_top if g_aux is None else torch.cat([g_top, g_aux], 1)
        g = g.float()
        fold = scale is not None
        in_sums = fold and ctx.in_sums  # the scale applied in W's segmented sum (`scaled_scatter_rows`)
        want_w = ctx.needs_input_grad[4]
        grad_w = per_expert = None
        if (FUSED_PICK_GRADS and weights is not None and (not fold or in_sums)
                and kernels.use_fused(g)):  # g_pre, ∂w and each token's sums per expert, one pass
            g_pre, grad_w, per_expert = kernels.pick_grads(g, z, slot, weights, experts,
                                                           N if in_sums else 0)
        else:
            live = z > 0  # ReLU'(pre) = 1[pre > 0]
            w_pick = weights.float().gather(1, slot) if weights is not None else torch.ones_like(g)
            g_pre = torch.where(live, g * w_pick, torch.zeros_like(g))  # ∂loss/∂pre of each pick
        # pre = W[f] · x_c + b[f], or with Feature Scaling folded in scale_i · (W[f] · x_c) +
        # ⟨shift_i, x_c⟩ + b[f] for f in expert i: ∂loss/∂(W[f] · x_c) of each pick
        g_rows = g_pre
        if in_sums and per_expert is None:  # Σ of g_pre over each slot's picks
            r = g_pre.new_zeros(experts.shape).scatter_add_(1, slot, g_pre)
        elif in_sums:
            r = None  # summed per expert by the pass above
        elif fold:  # g_pre · scale_i, and Σ of g_pre and of g_pre · u over each slot's picks
            g_rows, r, r_u = _pick_scale_sums(g_pre, slot, experts, u, scale)
        W_rows = W.reshape(N * m, d).float()
        grad_x = grad_centre = grad_W = grad_b = grad_scale = grad_shift = None
        want_x, want_centre, want_W, want_b = ctx.needs_input_grad[:4]
        want_scale, want_shift = ctx.needs_input_grad[11:13]
        if want_x:
            # Σ_picks g_pre · W[pick]: a weighted sum of k (+ k_aux) rows per token
            if in_sums:
                g_rows = g_pre * scale.float()[experts.gather(1, slot)]
                if r is None:
                    r = g_pre.new_zeros(experts.shape).scatter_add_(1, slot, g_pre)
            grad_x = F.embedding_bag(idx, W_rows, per_sample_weights=g_rows, mode="sum")
            if fold:  # and through ⟨shift_i, x_c⟩ of each slot
                grad_x = grad_x + (r[:, :, None] * shift.float()[experts]).sum(1)
            grad_x = grad_x.to(ctx.x_dtype)
        if fold and (want_shift or (want_W and ctx.mean_grad is not None)):
            # Σ over expert i's picks of g_pre · x_c (in sums: of the rows the products read)
            grad_shift = _expert_sums(x_c, experts, r, N, x_rows if in_sums else None, per_expert)
        row_dots = None
        if want_W or (in_sums and want_scale):
            # with `mean_grad`, each row of expert i also gets 1/m of ∂loss/∂mean_i, the share
            # of its gradient through the shift's dependence on the expert's mean row
            init = ctx.mean_grad(grad_shift) / m if fold and ctx.mean_grad is not None else None
            # resized, not viewed, to [N, m, d]: a tensor of its own, into which autograd adds
            # W's other gradients in place (where there are any)
            x_rows = x_rows if x_rows is not None else x_c.float()
            if in_sums:  # s_i · Σ + init, and each row's ⟨Σ, W[f]⟩ for s_i's gradient
                grad_W, row_dots = scaled_scatter_rows(idx, g_pre, x_rows, ctx.shared, scale,
                                                       init, W)
            else:
                grad_W = _scatter_rows(idx, g_rows, x_rows, N * m, ctx.shared, init)
            grad_W = grad_W.resize_(N, m, d).to(W.dtype) if want_W else None
        if want_b or want_centre:
            g_b = torch.zeros(N * m, dtype=torch.float32, device=W.device).index_add_(
                0, idx.reshape(-1), g_pre.reshape(-1))  # ∂b: Σ of g_pre over each feature's picks
            if want_b:
                grad_b = g_b.view(N, m).to(W.dtype)
            if want_centre:  # x_c = x − centre: −Σ_tokens ∂x_c = −∂b · W (see the docstring)
                if W_products is not None:  # the weights the products read (Ŵ in "sums")
                    grad_centre = -mm_float32(g_b.to(W_products.dtype)[None],
                                              W_products.reshape(N * m, d))[0]
                elif fold:  # Ŵ[f] = scale_i · W[f] + shift_i
                    g_b_experts = g_b.view(N, m)
                    grad_centre = -((g_b_experts * scale.float()[:, None]).reshape(-1) @ W_rows
                                    + g_b_experts.sum(1) @ shift.float())
                else:
                    grad_centre = -(g_b @ W_rows)
                grad_centre = grad_centre.to(ctx.x_dtype)
        if weights is not None and want_w and grad_w is None:  # (else `pick_grads` made it)
            # ∂f/∂w_i = z_i for each pick from expert slot i
            grad_w = torch.zeros(weights.shape, dtype=torch.float32, device=W.device).scatter_add_(
                1, slot, g * z).to(weights.dtype)
        grad_w = grad_w if want_w else None
        if fold and want_scale:  # Σ over expert i's picks of g_pre · (W[f] · x_c)
            if in_sums:  # = Σ over expert i's rows f of ⟨∂Ŵ[f] / s_i, W[f]⟩
                grad_scale = row_dots.view(N, m).sum(1)
            else:
                grad_scale = g_pre.new_zeros(N).index_add_(0, experts.reshape(-1), r_u.reshape(-1))
            grad_scale = grad_scale.to(scale.dtype)
        if grad_shift is not None:
            grad_shift = grad_shift.to(shift.dtype) if want_shift else None
        return (grad_x, grad_centre, grad_W, grad_b, grad_w, None, None, None, None, None, None,
                grad_scale, grad_shift, None)


def _pick_scale_sums(g: Tensor, slot: Tensor, experts: Tensor, u: Tensor,
                     scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """With Feature Scaling folded in, what the backward needs of the picks' gradients g [B, k]
    (float32): (g · scale of each pick's expert [B, k], Σ of g over each slot's picks [B, e],
    Σ of g · u over them [B, e]), u [B, k] the picks' products W_i x. One numba pass where
    `cpu_kernels.use` says so (`cpu_kernels.pick_scale_sums`), else a gather and two
    scatter-adds."""
    if cpu_kernels.use(g):
        return cpu_kernels.pick_scale_sums(g, slot, experts, u, scale)
    r = g.new_zeros(experts.shape).scatter_add_(1, slot, g)
    r_u = g.new_zeros(experts.shape).scatter_add_(1, slot, g * u)
    return g * scale.float()[experts.gather(1, slot)], r, r_u


def _expert_sums(x: Tensor, experts: Tensor, r: Tensor | None, n_experts: int,
                 rows: Tensor | None = None, per_expert: Tensor | None = None) -> Tensor:
    """[N, d] float32: Σ_b Σ_s r[b, s] · x[b] into row experts[b, s] — with Feature Scaling
    folded in, each expert's shift's gradient. numba's blocked sums where `cpu_kernels.use`
    says so (`cpu_kernels.expert_sums`), else r scattered into [B, N] and one product with x;
    with `rows` (x in the products' dtype, bf16 under autocast) that product in their dtype,
    accumulated and returned in float32 (a tensor-core GEMM on CUDA where a float32 one ran as
    a SIMT kernel). `per_expert` [B, N]: r already scattered (`kernels.pick_grads`)."""
    if per_expert is None and cpu_kernels.use(x):
        return cpu_kernels.expert_sums(x, experts, r, n_experts)
    if per_expert is None:
        per_expert = r.new_zeros(x.shape[0], n_experts).scatter_add_(1, experts, r.float())
    if rows is not None and rows.dtype != torch.float32:
        return mm_float32(per_expert.T.to(rows.dtype), rows)
    return per_expert.T @ x.float()


def mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for half-precision a and b, accumulated and returned in float32: one CUDA GEMM
    writing float32 (`torch.mm`'s out_dtype) where this PyTorch has it, else the product of
    their float32 copies (the same sums of exact products, in another order)."""
    if a.device.type == "cuda" and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
"""Whether `torch.mm` takes out_dtype (aten::mm.dtype, CUDA's half precision → float32)."""


def scaled_weights(W: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """Ŵ_i = scale_i · W_i + shift_i [N, m, d] for W [N, m, d], scale [N], shift [N, d],
    computed in float32 and rounded once to `dtype` (the products' dtype): the Triton
    `group_affine` where `kernels.use` says so, else `torch.addcmul`."""
    N, _, d = W.shape
    if kernels.use(W):
        return kernels.group_affine(W, scale.float(), shift.float().reshape(N, d), out_dtype=dtype)
    return torch.addcmul(shift.float().reshape(N, 1, d), W.float(),
                         scale.float()[:, None, None]).to(dtype)


def scaled_scatter_rows(idx: Tensor, g: Tensor, x: Tensor, shared: FeatureGroups | None,
                        scale: Tensor, init: Tensor | None, W: Tensor) -> tuple[Tensor, Tensor]:
    """`_scatter_rows`' sums S [M, d] for W [N, m, d] (M = N·m) with Feature Scaling's scale
    folded in: (scale_i · S[f] + init_i [M, d] float32 for each row f of expert i — init [N, d]
    or zeros — and ⟨S[f], W[f]⟩ [M] float32). One pass on CUDA (`kernels.scaled_segment_sum`),
    else `embedding_bag` and PyTorch's ops."""
    N, m, d = W.shape
    tokens, order, offsets = _feature_groups(idx, N * m, shared)
    w = g.reshape(-1)[order]
    init = init.float() if init is not None else W.new_zeros(N, d, dtype=torch.float32)
    if kernels.use_fused(x):
        return kernels.scaled_segment_sum(x, tokens, w, offsets, scale.float(), init,
                                          W.reshape(N * m, d))
    S = F.embedding_bag(tokens, x.float(), offsets[:-1], mode="sum", per_sample_weights=w.float())
    dots = (S * W.reshape(N * m, d).float()).sum(1)
    out = torch.addcmul(init[:, None, :], S.view(N, m, d), scale.float()[:, None, None])
    return out.view(N * m, d), dots


def _picks_on_cpu(x_c: Tensor, experts: Tensor | None, encode: ExpertEncode) -> bool:
    """Whether `_SparseTopK` runs a routed SAE's encode and TopK as `_expert_picks_cpu` (float32
    on the CPU, the numba kernels working), where Feature Scaling can be folded in."""
    return experts is not None and encode is grouped_expert_encode and cpu_kernels.use(x_c)


def folds_scaling(x: Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether `topk_encode_sparse` takes Feature Scaling folded into a routed SAE's encode for
    x computed in `compute_dtype` (`scaling`): where it runs as `_expert_picks_cpu`, and on
    CUDA where `CUDA_SCALING` says so ("epilogue" or "sums")."""
    if x.device.type == "cuda":  # "sums" where its segmented sum runs as the Triton pass
        return CUDA_SCALING == "epilogue" or (CUDA_SCALING == "sums" and kernels.use_fused(x))
    return (x.dtype == compute_dtype and cpu_kernels.use(x)
            and expert_encoder(x.device, compute_dtype) is grouped_expert_encode)


def _expert_picks_cpu(x_c: Tensor, W: Tensor, b: Tensor, experts: Tensor, weights: Tensor | None,
                      k: int, dead: Tensor | None, k_aux: int,
                      scaling: cpu_kernels.Scaling | None = None):
    """The CPU's form of `_preactivations` + `_weighted` + `topk_candidates` (+ AuxK) for a
    routed SAE, float32: each expert's matmul writes its pairs' W_i x straight into one buffer
    in expert order (no concatenation, no bias copied in first), and
    `cpu_kernels.topk_expert_rows` reads each token's candidates from there with the bias and
    its weights applied (no copy back into token order, no weighted copy: ~6 ms of a ~30 ms
    encode at the benchmark's size, torch profiler). Up to the rounding of the bias's addition,
    `grouped_expert_encode`'s values and picks. With `scaling`, W is taken as Feature Scaling's
    Ŵ_i = scale_i · W_i + shift_i without Ŵ written out (`cpu_kernels.Scaling`).

    Returns (outs, features, slots, z, u): the picks' weighted values (ReLU applied), their
    features and slots [TopK, then AuxK where asked], their pre-activations before weighting,
    ReLU applied, and the products W_i x at the picks."""
    N, m, _ = W.shape
    B, e = experts.shape
    # the pairs (pair p is token p // e's, as in _preactivations) sorted by expert, stably, by
    # numba's counting sort: `_expert_groups`' order without its argsort and bincount
    starts, order, rank = cpu_kernels.sort_picks(experts, N, ranks=True)
    bounds, sorted_tokens = starts.tolist(), torch.div(order, e, rounding_mode="floor")
    groups = [(i, bounds[i], sorted_tokens[bounds[i]:bounds[i + 1]])
              for i in range(N) if bounds[i + 1] > bounds[i]]
    pre = x_c.new_empty(B * e, m)
    for i, start, group_tokens in groups:
        torch.mm(x_c.index_select(0, group_tokens), W[i].T,
                 out=pre[start:start + group_tokens.numel()])
    rows = rank.view(B, e)  # each token's rows of `pre`, in slot order
    w = weights if weights is not None else x_c.new_ones(B, e)
    found = [cpu_kernels.topk_expert_rows(pre, b, rows, w, experts, k, scaling=scaling)]
    if dead is not None and k_aux > 0:
        most_dead = int(dead.view(N, m).sum(1)[experts].sum(1).max())
        k_aux = max(1, min(k_aux, most_dead))  # as the generic path on the CPU
        found.append(cpu_kernels.topk_expert_rows(pre, b, rows, w, experts, k_aux, dead,
                                                  scaling=scaling))

    def joined(name):  # TopK's, then AuxK's
        parts = [getattr(p, name) for p in found]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    outs = [p.values.relu_() for p in found]
    return outs, joined("features"), joined("slots"), joined("z").relu_(), joined("u")


class FeatureGroups:
    """A step's TopK picks grouped by feature, shared by the two backward passes that need it:
    the decoder's weight gradient and the encoder's both sum over the same picks sorted by
    feature (`_scatter_rows`, `cpu_kernels.decoder_grads`), so whichever runs first sorts them
    (a radix sort of B·k keys, its counts and offsets; on the CPU a counting sort) and the
    other reuses that. `_SparseTopK` attaches one to the TopK indices it returns;
    `_SparseDecode` finds it there. Only where AuxK adds no picks to the encoder's are the two
    sets of picks the same."""

    __slots__ = ("shape", "groups")

    def __init__(self):
        self.shape, self.groups = None, None


def _feature_groups(idx: Tensor, M: int, shared: FeatureGroups | None):
    """(tokens, order, offsets) of the picks idx [B, k] sorted by feature: pick p of the
    sorted order is `order[p]`, of token `tokens[p]`; feature f's picks are sorted positions
    offsets[f] to offsets[f + 1]. Taken from `shared` where it holds them for idx's shape."""
    if shared is not None and shared.shape == idx.shape:
        return shared.groups
    B, k = idx.shape
    flat = idx.reshape(-1)
    if cpu_kernels.use(idx, values=False):  # the same groups by a counting sort
        offsets, order = cpu_kernels.sort_picks(idx, M)
    else:
        order = torch.argsort(_narrow_keys(flat, M), stable=True)
        ends = torch.cumsum(expert_counts(flat, M), 0)  # one past each feature's last sorted pick
        offsets = torch.cat([ends.new_zeros(1), ends])
    groups = (torch.div(order, k, rounding_mode="floor"), order, offsets)
    if shared is not None:
        shared.shape, shared.groups = idx.shape, groups
    return groups


def _scatter_rows(idx: Tensor, g: Tensor, x: Tensor, M: int,
                  shared: FeatureGroups | None = None, init: Tensor | None = None) -> Tensor:
    """[M, d]: Σ over tokens b and picks j of g[b, j] · x[b] into row idx[b, j] — the encoder's
    gradient from the picks alone. The picks are sorted by feature, and each feature's rows are
    one segment of a segmented weighted sum over x (no atomics, no [B·k, d] products in
    memory): an `embedding_bag`, or the Triton `segment_sum` where `kernels.use` says so.
    Measured against the index_add (atomic adds) and sparse CSR × dense forms it replaced:
    2–4× faster than CSR on the CPU (bench in the README), and index_add was the largest
    kernel of a GPU step (benchmarks/profile_gpu.py). With `init` [G, d], each group of M / G
    rows gets that row added (on the CPU each row's sum starts from it)."""
    tokens, order, offsets = _feature_groups(idx, M, shared)
    if cpu_kernels.use(x):  # each pick's weight read where it is (no gathered copy of g)
        return cpu_kernels.segment_sums(x, tokens, g.reshape(-1), offsets, order=order,
                                        init=init)
    w = g.reshape(-1)[order]
    if kernels.use(x):
        out = kernels.segment_sum(x, tokens, w, offsets,
                                  out_dtype=torch.promote_types(x.dtype, w.dtype))
    else:
        out = F.embedding_bag(tokens, x, offsets[:-1], mode="sum", per_sample_weights=w)
    if init is not None:
        out.view(init.shape[0], -1, out.shape[1]).add_(init[:, None, :].to(out.dtype))
    return out


def _bag_rows(acts: Tensor, indices: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    """[B, d] = bias + Σ_j acts[b, j] · W[indices[b, j]]: the fast decode's forward (the
    Triton `segment_sum` where `kernels.use` says so, the numba `cpu_kernels.decode_rows` where
    `cpu_kernels.use` does — both start each row from the bias; else `embedding_bag`)."""
    if cpu_kernels.use(W) and acts.dtype == W.dtype and (bias is None or bias.dtype == W.dtype):
        return cpu_kernels.decode_rows(acts, indices, W, bias)
    if kernels.use(W):  # each row's sum started from the bias
        B, k = indices.shape
        offsets = torch.arange(0, B * k + 1, k, device=W.device)
        out_dtype = torch.promote_types(W.dtype, acts.dtype)
        if bias is not None:
            out_dtype = torch.promote_types(out_dtype, bias.dtype)
        return kernels.segment_sum(W, indices.reshape(-1), acts.reshape(-1), offsets,
                                   out_dtype=out_dtype, bias=bias)
    out = F.embedding_bag(indices, W, per_sample_weights=acts, mode="sum")
    return out if bias is None else out + bias


# -- decode: x̂ = Σ_j z_j · W_dec[idx_j] (+ b_dec) over each token's picks ----------------------
def decode_picks(acts: Tensor, indices: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
    """The plain reference: [B, d] = Σ_j acts[b, j] · W[indices[b, j]] (+ bias), an
    `embedding_bag` with its own autograd (the gradient of W through the bag's dense backward,
    that of `acts` as one dot product per pick)."""
    out = F.embedding_bag(indices, W, per_sample_weights=acts, mode="sum")
    return out if bias is None else out + bias


def with_column_sums(g: Tensor, sums: Tensor) -> Tensor:
    """g, carrying Σ_b g[b] [d] (computed by the pass that wrote g) for `column_sums`."""
    g._column_sums = sums
    return g


def column_sums(g: Tensor) -> Tensor:
    """Σ_b g[b] for a gradient g [B, d] reaching a bias added to every row: the sums g carries
    where the pass that wrote it made them as it went (`with_column_sums`: the squared error's
    backward on the CPU, where a pass of its own took ~0.4 ms at B 4,096, d 576), else `g.sum(0)`.
    Autograd hands a node the tensor the next one returned where nothing else adds into it;
    where it adds, the sum is a new tensor without them."""
    sums = getattr(g, "_column_sums", None)
    return sums if sums is not None and sums.shape == g.shape[1:] else g.sum(0)


FUSED_DECODER_GRADS = True
"""Where the Triton kernels run, both decoder gradients from one pass over the picks sorted by
feature (`kernels.decoder_grads`), as the CPU's numba kernels do, instead of `picked_dots` and
`segment_sum` apart. A switch for `benchmarks/profile_gpu.py --parts fusions`' A/B."""


class _SparseDecode(torch.autograd.Function):
    """Forward: `decode_picks`. Backward: ∂acts[b, j] = ⟨g[b], W[idx[b, j]]⟩ for all picks at
    once as a sampled dense-dense product (SDDMM: g · Wᵀ evaluated only where a token picked a
    feature; `_picked_dots`), and ∂W by `_scatter_rows`, the encoder's segmented sum where the
    bag's own backward adds each pick's row into a dense gradient. On the CPU, at the
    benchmark's size (B 4,096, k 32, M 4,608, d 576), these two took ~25 ms where the bag's own
    backward took 60–90 ms (benchmarks/bench_train.py measures the whole step); with the numba
    kernels, both come from one pass over the picks sorted by feature
    (`cpu_kernels.decoder_grads`, each gathered row of g read once for both: the backward phase of
    a step 20.8 against 23.5 ms for Scale e=2, 16.3 against 19.1 ms for dense TopK, medians of
    40 interleaved steps)."""

    @staticmethod
    def forward(ctx, acts, indices, W, bias):
        ctx.save_for_backward(acts, indices, W)
        ctx.shared = getattr(indices, "_feature_groups", None)  # the encoder's (FeatureGroups)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _bag_rows(acts, indices, W, bias)

    @staticmethod
    def backward(ctx, g):
        acts, indices, W = ctx.saved_tensors
        grad_acts = grad_W = grad_bias = None
        if ctx.needs_input_grad[3]:  # the bias is added to every token's row
            grad_bias = column_sums(g).to(ctx.bias_dtype)
        both = all(ctx.needs_input_grad[i] for i in (0, 2))
        if both and cpu_kernels.use(W) and g.dtype == acts.dtype == torch.float32:
            _, order, offsets = _feature_groups(indices, W.shape[0], ctx.shared)
            # both in one pass over the picks
            grad_acts, grad_W = cpu_kernels.decoder_grads(g, W, acts, offsets, order)
            return grad_acts, None, grad_W, grad_bias
        if both and FUSED_DECODER_GRADS and kernels.use(W) and W.dtype == torch.float32:
            tokens, order, offsets = _feature_groups(indices, W.shape[0], ctx.shared)
            grad_acts, grad_W = kernels.decoder_grads(g.float(), W, acts, tokens, order, offsets)
            return grad_acts.to(acts.dtype), None, grad_W, grad_bias
        if ctx.needs_input_grad[0]:
            grad_acts = _picked_dots(indices, g.to(W.dtype), W).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _scatter_rows(indices, acts.to(g.dtype), g, W.shape[0], ctx.shared).to(W.dtype)
        return grad_acts, None, grad_W, grad_bias


_BAG_WEIGHTS_GRAD = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
"""The kernel behind `_picked_dots`: internal to PyTorch (present since before 2.4); were a
later version to drop it, `picks_decoder` falls back to the bag's own backward."""


def _picked_dots(idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """[B, k]: ⟨g[b], W[idx[b, j]]⟩, one dot product per pick (a sampled dense-dense product).
    It is the kernel `embedding_bag` itself runs for the gradient of its per-sample weights,
    called alone: one pass over the picks in any order, a feature picked twice included, in
    any dtype. It replaced `torch.sparse.sampled_addmm` over a CSR pattern of the picks, which
    needed each token's picks sorted, a fallback for repeated features and float32/64; the
    two took the same time at the benchmark's size on the CPU (10.3 vs 10.6 ms, median of 40
    interleaved calls). Where `kernels.use` says so, the Triton `picked_dots` instead; where
    `cpu_kernels.use` says so, the numba one (2.9 vs 5.8 ms at that size)."""
    if kernels.use(W):
        return kernels.picked_dots(g, W, idx, out_dtype=W.dtype)
    if cpu_kernels.use(W) and g.dtype == W.dtype:
        return cpu_kernels.picked_dots(g, W, idx)
    B, k = idx.shape
    offsets = torch.arange(0, B * k, k, device=idx.device)
    bag_of_pick = torch.arange(B, device=idx.device).repeat_interleave(k)
    dots = _BAG_WEIGHTS_GRAD(g.contiguous(), W, idx.reshape(-1).contiguous(), offsets,
                             bag_of_pick, 0, -1)  # mode 0: sum
    return dots.view(B, k)


def decode_picks_sddmm(acts: Tensor, indices: Tensor, W: Tensor,
                       bias: Tensor | None = None) -> Tensor:
    """`decode_picks` with the backward of `_SparseDecode`."""
    return _SparseDecode.apply(acts, indices, W, bias)


def picks_decoder(device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    """The decode for weights of `dtype` on `device`: the sparse backward for float32 and
    float64 weights on the CPU and on CUDA, where it was measured faster (on the CPU, above; on
    an H100 the recorded bf16 step, whose master weights are float32, took 3.79 against 3.91 ms
    for Scale e=2 and 4.66 against 4.82 ms for dense TopK, `benchmarks/profile_gpu.py --parts
    decoder`); the bag's own backward elsewhere (half-precision weights, other devices, and
    wherever this PyTorch lacks its kernel)."""
    if (device.type in ("cpu", "cuda") and dtype in (torch.float32, torch.float64)
            and _BAG_WEIGHTS_GRAD is not None):
        return decode_picks_sddmm
    return decode_picks


def topk_encode_sparse(
    x: Tensor, centre: Tensor | None, W: Tensor, b: Tensor, k: int,
    experts: Tensor | None = None, weights: Tensor | None = None, dead: Tensor | None = None,
    k_aux: int = 0, encode: ExpertEncode = grouped_expert_encode,
    compute_dtype: torch.dtype | None = None, scaling: tuple[Tensor, Tensor] | None = None,
    mean_grad: Callable[[Tensor], Tensor] | None = None,
) -> TopKCodes:
    """`topk_encode` with a backward over the selected latents only; the candidates are
    computed in `compute_dtype` (bf16 under autocast), gradients in float32. On a GPU AuxK
    takes exactly k_aux picks (zeros where fewer features are dead: they add nothing), so
    nothing is read on the host; on the CPU, where reading costs nothing, no more picks than
    the most dead candidates any token has (each zero pick costs a row in the backward).

    With `scaling` (scale [N], shift [N, d]) each expert's encoder rows are Feature Scaling's
    Ŵ_i = scale_i · W_i + shift_i (METHOD §3). Where `folds_scaling` says so, Ŵ is never
    written out: Ŵ_i x_c = scale_i · (W_i x_c) + ⟨shift_i, x_c⟩ is formed per candidate, and
    the backward gives W, scale and shift their gradients from the picks; elsewhere Ŵ is
    formed with autograd first.

    `mean_grad`, with a folded `scaling` whose shift depends on each expert's mean row of W
    taken as a constant (Feature Scaling's): maps the shift's gradient [N, d] to the means'
    [N, d], and 1/m of it is added to each of the expert's rows of W's gradient as the backward
    sums them (no pass of its own over W's gradient)."""
    if compute_dtype is None:
        compute_dtype = products_dtype(x)
    scale = shift = None
    if scaling is not None:
        if folds_scaling(x, compute_dtype):
            scale, shift = scaling
        else:
            W = scaling[0][:, None, None] * W + scaling[1][:, None, :]
    if mean_grad is not None and scale is None:
        raise ValueError("mean_grad needs Feature Scaling folded into the encode (scaling, "
                         "where folds_scaling holds)")
    with torch.autocast(x.device.type, enabled=False):
        top, idx, aux, aux_idx = _SparseTopK.apply(
            x, centre, W, b, weights, experts, dead if k_aux > 0 else None, k, k_aux, encode,
            compute_dtype, scale, shift, mean_grad,
        )
    return TopKCodes(top, idx, aux, aux_idx)
