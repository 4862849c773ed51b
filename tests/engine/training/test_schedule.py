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


# -- the weights' fused step (kernels.adam_rows_), through Triton's interpreter on the CPU
def _sae_with_grads(scale: float, seed: int = 0):
    from engine.sae import SAEConfig, build_sae

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=12, width=40, k=4, arch="scale", experts=4, active=2))
    sae.kernels = "fast"
    return sae


def _set_grads(sae, scale: float, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in sae.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.fixture
def triton_on_cpu(triton_interpreter, monkeypatch):
    monkeypatch.setattr(triton_interpreter, "ENABLED", {"cpu": True})
    return triton_interpreter


@pytest.fixture(params=["triton", "numba"])
def row_kernels(request):
    """The module whose fused passes step the weights: the Triton kernels (through the
    interpreter) or the CPU's numba kernels, which `_row_kernels` picks for a CPU tensor where
    Triton's do not run."""
    if request.param == "triton":
        return request.getfixturevalue("triton_on_cpu")
    return request.getfixturevalue("numba_kernels")  # skipped only under MOESAE_NUMBA=0


@pytest.mark.parametrize("scale", [1e-3, 10.0], ids=["under the clip", "clipped"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["lr a number", "lr a tensor"])
@pytest.mark.parametrize("encoder", [True, False], ids=["encoder too", "decoder only"])
def test_the_fused_weight_step_is_pytorchs_passes(row_kernels, monkeypatch, scale, tensor_lr,
                                                  encoder):
    """Three steps of `optimiser_step`: one pass over the decoder (projection, clip, Adam, unit
    norm) and one over the encoder (clip, Adam) against the projection, clip_grad_norm_, Adam
    and renormalisation in PyTorch's own forms: every weight and both moments to float32
    rounding, and the optimiser state under the same keys (so a checkpoint of either loads
    into the other)."""
    from engine.training import schedule

    monkeypatch.setattr(schedule, "FUSED_ENCODER_ADAM", encoder)
    ref, fast = _sae_with_grads(scale), _sae_with_grads(scale)
    ref.kernels = "reference"  # its projection and renormalisation in PyTorch
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    opt_ref, opt_fast = make_adam(ref.parameters(), lr), make_adam(fast.parameters(), lr)
    assert schedule._row_kernels(fast.W_dec) is row_kernels  # its one try made before counting
    seen = []
    real = row_kernels.adam_rows_
    monkeypatch.setattr(row_kernels, "adam_rows_", lambda *a, **kw: seen.append(kw["decoder"]) or real(*a, **kw))
    for step in range(3):
        _set_grads(ref, scale, step)
        _set_grads(fast, scale, step)
        schedule.optimiser_step(ref, opt_ref, 1.0)
        schedule.optimiser_step(fast, opt_fast, 1.0)
    assert seen == ([True, False] if encoder else [True]) * 3  # only for the fast SAE
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
        a, b = opt_ref.state[p], opt_fast.state[q]
        assert a.keys() == b.keys() and float(a["step"]) == float(b["step"]) == 3.0
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=1e-4, atol=1e-9), name
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-4, atol=1e-12), name
    assert torch.allclose(fast.W_dec.norm(dim=1), torch.ones(40), atol=1e-6)
    assert not hasattr(opt_fast, "grad_scale")


def test_the_fused_weight_step_stands_aside_where_it_cannot_run(row_kernels, monkeypatch):
    """The plain passes where the fused one does not apply: the reference kernels, the switch
    off, unfused Adam; and where the kernels fail their first try."""
    from engine.training import schedule

    sae = _sae_with_grads(1.0)
    _set_grads(sae, 1.0, 0)
    opt = make_adam(sae.parameters(), 1e-2)
    group = opt.param_groups[0]
    monkeypatch.setattr(schedule, "FUSED_ENCODER_ADAM", True)
    assert schedule._fused_weights(sae, opt) == [(sae.W_dec, group, True), (sae.W_enc, group, False)]
    sae.kernels = "reference"
    assert schedule._fused_weights(sae, opt) == []
    sae.kernels = "fast"
    monkeypatch.setattr(schedule, "FUSED_WEIGHT_STEP", False)
    assert schedule._fused_weights(sae, opt) == []
    monkeypatch.setattr(schedule, "FUSED_WEIGHT_STEP", True)
    unfused = torch.optim.Adam(sae.parameters(), lr=1e-2)
    assert schedule._fused_weights(sae, unfused) == []
    sae.W_enc.grad = None  # the decoder alone
    assert schedule._fused_weights(sae, opt) == [(sae.W_dec, group, True)]
    from engine.sae import cpu_kernels

    if row_kernels is not cpu_kernels:  # Triton's failing its try leaves the CPU's numba ones
        monkeypatch.setattr(row_kernels, "adam_works", lambda device: False)
        assert schedule._row_kernels(sae.W_dec) is (cpu_kernels if cpu_kernels.use(sae.W_dec) else None)
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)  # and where those do not run either
    assert schedule._fused_weights(sae, opt) == []
