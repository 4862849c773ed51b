"""Initialisation shared by every architecture (METHOD.md §3 recipe)."""

from __future__ import annotations

import torch
from torch import Tensor


def unit_rows(M: int, d: int) -> Tensor:
    """[M, d] random directions with unit norm: the decoder, and the encoder it starts as."""
    w = torch.randn(M, d)
    return w / w.norm(dim=1, keepdim=True)


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; starts from the mean and stops early when it settles."""
    x = x.detach().float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= eps * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y
