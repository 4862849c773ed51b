"""Routing and expert encoding for the MoE SAEs (METHOD.md §2–3).

Only the selected experts are computed: tokens are grouped by expert and each expert's
encoder block multiplies just its own tokens, so the encoder costs ~e/N of a dense SAE of
the same width. This is the plain reference; faster versions live beside it under the same
names and are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def route_topk(probs: Tensor, e: int, weighting: str) -> tuple[Tensor, Tensor]:
    """Pick the e most probable experts and their weights (METHOD §3, Multiple Expert Activation).

    `softmax`: w_i = softmax over the *selected probabilities* (not the logits), which gives
    weights near 1/e. `binary`: w_i = 1 for every selected expert (the 0/1 ablation).
    """
    top_p, top_i = probs.topk(e, dim=-1)
    if weighting == "softmax":
        w = torch.softmax(top_p, dim=-1)
    else:
        w = torch.ones_like(top_p)
    return top_i, w


def grouped_expert_encode(
    x_c: Tensor, token_idx: Tensor, expert_idx: Tensor, W: Tensor, b: Tensor
) -> Tensor:
    """ReLU(W[i] x + b[i]) for each (token, expert) pair, computing only those pairs.

    Pairs are sorted by expert and each expert's block is one matmul over just its tokens,
    so the cost is (pairs × m × d), i.e. ~e/N of a dense SAE of the same width.
    x_c [B, d], token_idx/expert_idx [P], W [N, m, d], b [N, m] → [P, m] in pair order.
    """
    N, m, _ = W.shape
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=N).tolist()
    sorted_tokens = token_idx[order]
    # unbind: one autograd node for all experts, rather than a full-size zero gradient per
    # expert slice (which would cost N × M·d writes per backward pass).
    W_i, b_i = W.unbind(0), b.unbind(0)
    blocks = []
    start = 0
    for i, c in enumerate(counts):
        if c == 0:
            continue
        xs = x_c[sorted_tokens[start : start + c]]
        blocks.append(F.relu(F.linear(xs, W_i[i], b_i[i])))
        start += c
    if not blocks:
        return x_c.new_zeros(0, m)
    out_sorted = torch.cat(blocks, 0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out_sorted[inverse]
