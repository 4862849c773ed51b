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


def clipped_step(opt: torch.optim.Optimizer, params, max_norm: float) -> None:
    """`clip_grad_norm_(params, max_norm)` then `opt.step()`. With fused Adam the clip's scale
    goes into Adam's own kernel (its `grad_scale` input, by which it divides each gradient as it
    reads it) instead of a pass multiplying every gradient first: the same update up to the
    rounding of 1/scale (~0.04 ms of a 2.4 ms step on an H100). That needs every group fused
    (a checkpoint written by unfused Adam loads its groups as such) and `params` to be exactly
    the parameters the optimiser steps; otherwise it clips as usual."""
    params = [p for p in params if p.grad is not None]
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch ≥ 2.6
    stepped = {id(p) for group in opt.param_groups for p in group["params"] if p.grad is not None}
    if (get_total_norm is None or not params or {id(p) for p in params} != stepped
            or not all(group.get("fused") for group in opt.param_groups)):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return
    total = get_total_norm([p.grad for p in params])
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grad_norm_
    opt.grad_scale = coef.reciprocal().float()  # fused Adam takes a float32 scale
    try:
        opt.step()
    finally:
        del opt.grad_scale


def optimiser_step(sae, opt: torch.optim.Optimizer, max_norm: float) -> None:
    """What follows the backward pass in every training step (METHOD §3): the decoder gradient
    made orthogonal to its unit rows, the gradients clipped to `max_norm` in global norm, an
    Adam step, the decoder rows put back to unit norm."""
    sae.remove_gradient_parallel_to_decoder()
    clipped_step(opt, sae.parameters(), max_norm)
    sae.set_decoder_norm_to_unit()
