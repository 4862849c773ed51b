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


def _spy_on_scale(opt):
    """Records, at each step, whether Adam was handed the clip's scale."""
    seen, step = [], opt.step

    def spied(*a, **kw):
        seen.append(getattr(opt, "grad_scale", None) is not None)
        return step(*a, **kw)

    opt.step = spied
    return seen


def test_fused_adam_gets_the_clip_as_its_scale_and_other_cases_clip_apart():
    """The fold runs where it can (fused Adam over exactly the clipped parameters), and each
    case it cannot take falls back to clip_grad_norm_ + step with the same result."""
    a = _params(10.0)
    opt = make_adam(a, 1e-2)
    seen = _spy_on_scale(opt)
    clipped_step(opt, a, 1.0)
    assert seen == [True]
    # clipping fewer parameters than the optimiser steps: the fold would scale them all
    b, c = _params(10.0), _params(10.0)
    opt_b, opt_c = make_adam(b, 1e-2), make_adam(c, 1e-2)
    seen = _spy_on_scale(opt_b)
    clipped_step(opt_b, b[:1], 1.0)
    torch.nn.utils.clip_grad_norm_(c[:1], 1.0)
    opt_c.step()
    assert seen == [False] and all(torch.equal(p, q) for p, q in zip(b, c, strict=True))


def test_resuming_an_unfused_checkpoint_steps_as_it():
    """A checkpoint written by unfused Adam loads its groups with fused=None: the step then
    clips apart (fused Adam's scale input would be refused by the unfused kernels)."""
    a, b = _params(10.0), _params(10.0)
    unfused = torch.optim.Adam(a, lr=1e-2, betas=(0.9, 0.999))
    torch.nn.utils.clip_grad_norm_(a, 1.0)
    unfused.step()
    opt = make_adam(b, 1e-2)
    opt.load_state_dict(unfused.state_dict())
    assert not opt.param_groups[0].get("fused")
    for p in b:
        p.grad = torch.ones_like(p) * 10
    seen = _spy_on_scale(opt)
    clipped_step(opt, b, 1.0)
    assert seen == [False]


def test_float64_parameters_take_the_fold():
    """The scale is handed to Adam in float32, what its fused kernel takes, whatever the
    parameters' dtype."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn(4, 3, dtype=torch.float64) * 10
    q.grad = p.grad.clone()
    opt_p, opt_q = make_adam([p], 1e-2), make_adam([q], 1e-2)
    clipped_step(opt_p, [p], 1.0)
    torch.nn.utils.clip_grad_norm_([q], 1.0)
    opt_q.step()
    assert torch.allclose(p, q, rtol=1e-6)
