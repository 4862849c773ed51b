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
    if not _folds(opt, params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return
    _scaled_step(opt, _clip_scale(torch.nn.utils.get_total_norm([p.grad for p in params]), max_norm))


def _folds(opt: torch.optim.Optimizer, params: list) -> bool:
    """Whether the clip can go into fused Adam's `grad_scale`: torch ≥ 2.6 (`get_total_norm`),
    every group fused, and `params` (those with gradients) exactly what the optimiser steps."""
    stepped = {id(p) for group in opt.param_groups for p in group["params"] if p.grad is not None}
    return (getattr(torch.nn.utils, "get_total_norm", None) is not None and bool(params)
            and {id(p) for p in params} == stepped
            and all(group.get("fused") for group in opt.param_groups))


def _clip_scale(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What the gradients are divided by for a global norm `total`: 1 / clip_grad_norm_'s
    coefficient, in float32 (what fused Adam takes)."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0).reciprocal().float()


def _scaled_step(opt: torch.optim.Optimizer, scale: torch.Tensor) -> None:
    """`opt.step()` with each gradient divided by `scale` as fused Adam reads it; nothing of the
    scale is left on the optimiser after (nor in a checkpoint)."""
    opt.grad_scale = scale
    try:
        opt.step()
    finally:
        del opt.grad_scale


FUSED_WEIGHT_STEP = True
"""Whether `optimiser_step` steps the decoder by one pass where it can (`_fused_weights`): its
gradient's projection, the clip, the Adam update and the rows' renormalisation, which PyTorch
runs as four passes (with fused Adam's own kernel for the update) — a Triton kernel on a GPU,
a numba one on the CPU (`_row_kernels`). On an H100 at the paper's size, recorded bf16 steps:
Scale e=2 1.837 against 1.937 ms, dense TopK 3.085 against 3.182 ms (benchmarks/profile_gpu.py
--parts tail); on the development CPU (2 threads) at bench_train.py's size, the optimiser's
phase of a step 6.2 against 7.2 ms for Scale e=2, 6.6 against 7.1 ms for dense TopK (medians of
40 interleaved steps; the encoder's own numba pass was slower there too, 6.9 and 7.1 ms).
False keeps PyTorch's passes."""

FUSED_ENCODER_ADAM = False
"""With `FUSED_WEIGHT_STEP`, whether the encoder's Adam update is a Triton pass of its own too
(`kernels.adam_rows_` without the decoder's projection and renormalisation) instead of part of
fused Adam's multi-tensor kernel. Measured no faster on an H100 (Scale e=2 1.834–1.842 against
1.837 ms, dense TopK 3.067–3.075 against 3.085 ms; same A/B), nor with the numba pass on the
CPU (above), so off; kept for the A/B."""


def optimiser_step(sae, opt: torch.optim.Optimizer, max_norm: float) -> None:
    """What follows the backward pass in every training step (METHOD §3): the decoder gradient
    made orthogonal to its unit rows, the gradients clipped to `max_norm` in global norm, an
    Adam step, the decoder rows put back to unit norm."""
    fused = _fused_weights(sae, opt)
    if fused:
        _fused_weight_step(sae, opt, fused, max_norm)
        return
    sae.remove_gradient_parallel_to_decoder()
    clipped_step(opt, sae.parameters(), max_norm)
    sae.set_decoder_norm_to_unit()


def _fused_weights(sae, opt: torch.optim.Optimizer) -> list:
    """[(weight, its parameter group, whether it is the decoder)] that `_fused_weight_step`
    steps by Triton passes, or [] where it does not apply: the fast kernels on a device where
    the Triton kernels run, float32 contiguous [M, d] weights and gradients, fused Adam in every
    group (the clip folded in, as `clipped_step`) with no weight decay, AMSGrad or
    maximisation, and exactly the SAE's parameters with gradients to step. The decoder must
    qualify; the encoder joins it where it does too."""
    if (not FUSED_WEIGHT_STEP or getattr(sae, "kernels", "reference") == "reference"
            or not _folds(opt, [p for p in sae.parameters() if p.grad is not None])):
        return []

    def entry(W, decoder: bool):
        g = W.grad if isinstance(W, torch.nn.Parameter) else None
        if g is None or not (W.dtype == g.dtype == torch.float32 and W.is_contiguous()
                             and g.is_contiguous() and W.dim() == 2
                             and _row_kernels(W) is not None):
            return None
        group = next(group for group in opt.param_groups if any(p is W for p in group["params"]))
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            return None
        return (W, group, decoder)

    dec = entry(getattr(sae, "W_dec", None), True)
    if dec is None:
        return []
    enc = entry(getattr(sae, "W_enc", None), False) if FUSED_ENCODER_ADAM else None
    return [dec] if enc is None else [dec, enc]


def _row_kernels(W: torch.Tensor):
    """The module whose fused optimiser passes (`projected_sq_norms`, `adam_rows_`) run for
    weight W, or None: the Triton kernels where they run and passed their first try on W's
    device, else the numba kernels for a CPU tensor where they run."""
    from engine.sae import cpu_kernels, kernels

    if kernels.use(W) and kernels.adam_works(W.device):
        return kernels
    return cpu_kernels if cpu_kernels.use(W) else None


def _fused_weight_step(sae, opt: torch.optim.Optimizer, fused: list, max_norm: float) -> None:
    """`optimiser_step` with the weights in `fused` stepped by `adam_rows_` (`_row_kernels`):
    the global norm takes the decoder's rows as projected (`projected_sq_norms`, read without
    being written), fused Adam steps every other parameter with the clip's scale, and one pass
    over each weight clips and steps it (the decoder's also projects and renormalises). The
    same update as PyTorch's passes up to float32 rounding (tests/engine/training/
    test_schedule.py); the decoder's `.grad` is left unprojected. Adam's state for these
    weights is the optimiser's own (same keys), so checkpoints are unchanged."""
    W = sae.W_dec
    g = W.grad
    ops = _row_kernels(W)
    others = [p.grad for p in sae.parameters() if p.grad is not None and p is not W]
    sq = ops.projected_sq_norms(g, W).sum()
    if others:
        sq = sq + torch.nn.utils.get_total_norm(others).float().square()
    scale = _clip_scale(sq.sqrt(), max_norm)
    grads = [p.grad for p, _, _ in fused]
    for p, _, _ in fused:
        p.grad = None  # Adam skips these
    try:
        if any(p.grad is not None for p in sae.parameters()):
            _scaled_step(opt, scale)
    finally:
        for (p, _, _), grad in zip(fused, grads, strict=True):
            p.grad = grad
    for p, group, decoder in fused:
        state = opt.state[p]
        if not state:  # as fused Adam's first step initialises it
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"].add_(1)
        ops.adam_rows_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group["lr"],
                           state["step"], scale, group["betas"], group["eps"], decoder=decoder)
