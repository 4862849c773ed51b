"""Expert load: the share of tokens each expert receives, and how even that is (METHOD §4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def load_entropy(load: Tensor | list[float]) -> float | None:
    """Entropy of an expert-load distribution divided by log N (1 = perfectly balanced);
    None for a single expert. `load` may be counts or shares."""
    p = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    if p.numel() < 2 or float(p.sum()) <= 0:
        return None
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(p.numel()))
