"""The optimiser step shared by the trainer and the benchmarks (engine/training/schedule.py):
the clip folded into fused Adam against `clip_grad_norm_` followed by the step."""

from __future__ import annotations

import pytest
import torch

from engine.training.schedule import clipped_step, make_adam


def _params(scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


@pytest.mark.parametrize("scale", [0.01, 10.0], ids=["under the clip", "clipped"])
@pytest.mark.parametrize("fused", [True, False])
def test_the_folded_clip_is_clip_grad_norm_then_the_step(scale, fused):
    """Three steps on the same gradients: the weights and Adam's moments as with
    `clip_grad_norm_` then `step()`, to float32 rounding (1/scale is rounded once)."""
    a, b = _params(scale), _params(scale)
    opt_a = torch.optim.Adam(a, lr=1e-2, betas=(0.9, 0.999), fused=fused)
    opt_b = make_adam(b, 1e-2) if fused else torch.optim.Adam(b, lr=1e-2, betas=(0.9, 0.999))
    for step in range(3):
        for p, q in zip(a, b, strict=True):
            q.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * scale
            p.grad = q.grad.clone()
        torch.nn.utils.clip_grad_norm_(a, 1.0)
        opt_a.step()
        clipped_step(opt_b, b, 1.0)
        assert not hasattr(opt_b, "grad_scale")  # nothing left for the next step or a checkpoint
    for p, q in zip(a, b, strict=True):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt_a.state[p][key], opt_b.state[q][key], rtol=1e-5, atol=1e-12)


def test_parameters_without_gradients_are_left_out():
    a = _params(1.0)
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = make_adam([*a, frozen], 1e-2)
    clipped_step(opt, [*a, frozen], 1.0)
    assert torch.equal(frozen, torch.ones(3)) and frozen not in opt.state
