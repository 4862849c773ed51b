"""Learning rate: its size for a dictionary width and its schedule over steps (METHOD.md §3)."""

from __future__ import annotations

import math

import torch


def lr_for_width(width: int) -> float:
    """METHOD §3: lr = 2e-4 / sqrt(M / 2^14) (OpenAI's TopK scaling rule)."""
    return 2e-4 / math.sqrt(width / 2**14)


def lr_at(step: int, steps: int, lr: float, decay_fraction: float) -> float:
    """Constant, then linear decay to 0 over the last `decay_fraction` of the steps."""
    decay_start = int(steps * (1 - decay_fraction))
    if step < decay_start:
        return lr
    return lr * max(0.0, (steps - step) / max(1, steps - decay_start))


def make_adam(params, lr: float | torch.Tensor, capturable: bool = False) -> torch.optim.Adam:
    """Adam(0.9, 0.999) (METHOD §3), the fused kernel where this torch build has one.
    `capturable` (CUDA): its step count stays on the device and `lr` may be a device tensor,
    so that its step can be recorded in a CUDA graph and the schedule still applies."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True, capturable=capturable)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), capturable=capturable)
