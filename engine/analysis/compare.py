"""Two SAEs of the same model and hook, feature by feature: which features both learned, which
only one has, and which experts correspond — all by decoder cosine.

For every feature of A: its nearest feature in B (largest cosine) and its partner in a
one-to-one matching of A's and B's features. The matching is greedy on the candidate pairs
(each feature's `candidates` nearest features in the other SAE, both ways), highest cosine
first — within a factor of two of the optimal total, and computed in blocks, so memory is
O(block · M + M · candidates) whatever the widths (an exact assignment would need the full
M_A × M_B matrix: 2.4 GB at M = 24,576).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Matches(NamedTuple):
    nearest_ab: Tensor
    """[M_A] each A feature's nearest B feature."""
    nearest_ab_cos: Tensor
    """[M_A] its cosine."""
    nearest_ba: Tensor
    """[M_B] each B feature's nearest A feature."""
    nearest_ba_cos: Tensor
    """[M_B] its cosine."""
    partner_ab: Tensor
    """[M_A] the B feature matched one-to-one to each A feature (−1: none left)."""
    partner_ab_cos: Tensor
    """[M_A] their cosine (NaN where there is no partner)."""
    partner_ba: Tensor
    """[M_B] the inverse matching."""


def _unit(W: Tensor) -> Tensor:
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _top(A: Tensor, B: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    """[M_A, k] the k most similar rows of B for each row of A (cosines, indices)."""
    vals, idx = [], []
    for s in range(0, len(A), block):
        v, i = (A[s : s + block] @ B.T).topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


@torch.no_grad()
def match_features(W_a: Tensor, W_b: Tensor, candidates: int = 5, block: int | None = None) -> Matches:
    """Nearest features both ways and a greedy one-to-one matching (see the module docstring)."""
    A, B = _unit(W_a), _unit(W_b)
    block = block or max(1, 2**24 // max(len(B), len(A), 1))
    k = max(1, min(candidates, len(A), len(B)))
    v_ab, i_ab = _top(A, B, k, block)
    v_ba, i_ba = _top(B, A, k, block)
    # candidate pairs (a, b, cos) from both directions, highest cosine first
    a = torch.cat([torch.arange(len(A)).repeat_interleave(k), i_ba.reshape(-1).cpu()])
    b = torch.cat([i_ab.reshape(-1).cpu(), torch.arange(len(B)).repeat_interleave(k)])
    c = torch.cat([v_ab.reshape(-1).cpu(), v_ba.reshape(-1).cpu()])
    order = torch.argsort(c, descending=True, stable=True).numpy()
    a_np, b_np, c_np = a.numpy(), b.numpy(), c.numpy()
    partner_ab = np.full(len(A), -1, np.int64)
    partner_ba = np.full(len(B), -1, np.int64)
    partner_cos = np.full(len(A), np.nan, np.float32)
    for j in order:  # greedy: a pair is taken when both its features are still free
        x, y = a_np[j], b_np[j]
        if partner_ab[x] < 0 and partner_ba[y] < 0:
            partner_ab[x], partner_ba[y], partner_cos[x] = y, x, c_np[j]
    return Matches(i_ab[:, 0].cpu(), v_ab[:, 0].cpu(), i_ba[:, 0].cpu(), v_ba[:, 0].cpu(),
                   torch.from_numpy(partner_ab), torch.from_numpy(partner_cos),
                   torch.from_numpy(partner_ba))


def expert_correspondence(nearest: Tensor, nearest_cos: Tensor, expert_a: Tensor,
                          expert_b: Tensor, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    """([N_A, N_B] share of A's expert-i features whose nearest B feature lies in B's expert j,
    [N_A, N_B] the mean cosine of those matches; NaN where there are none)."""
    ea = expert_a.long().numpy()
    eb = expert_b.long().numpy()[nearest.long().numpy()]
    cos = nearest_cos.float().numpy()
    count = np.zeros((n_a, n_b))
    total = np.zeros((n_a, n_b))
    np.add.at(count, (ea, eb), 1)
    np.add.at(total, (ea, eb), cos)
    per_a = np.maximum(np.bincount(ea, minlength=n_a), 1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    return count / per_a, mean
