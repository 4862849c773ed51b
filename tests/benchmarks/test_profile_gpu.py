"""profile_gpu.py's A/B parts on the CPU at a tiny size, so that a run on a GPU machine, where
device time is short, does not end in a bug of the script's own (the numbers are the
benchmark's business, not a test's)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TINY = dict(d=16, width=256, experts=8, k=4, batch=64)
SMALL = dict(d=8, width=64, experts=8, k=4, batch=16)
"""For the decoder A/B, whose Triton variant runs through Triton's interpreter on the CPU."""


def test_the_decoder_and_topk_ab_parts_run_and_restore_the_defaults():
    from benchmarks import profile_gpu
    from engine.sae import base, moe

    cpu = torch.device("cpu")
    chosen, slices = base.picks_decoder, dict(moe.TOPK_SLICE)
    out = {"decoder_ab": [], "topk": []}
    profile_gpu.profile_decoders(SMALL, cpu, ["topk", "scale e=2"], out, rounds=1)
    profile_gpu.profile_topk(TINY, cpu, ["topk"], out, rounds=1)
    assert [r["model"] for r in out["decoder_ab"]] == ["topk", "scale e=2"]
    from engine.sae import kernels

    labels = {"bag backward", "segmented sum"} | (
        {"triton", "triton, clip apart"} if kernels.interpreted() else set())
    for row in out["decoder_ab"]:
        assert "error" not in row and set(row["ms"]) == labels
    assert [r["n"] for r in out["topk"]] == [256, 64]
    dense = out["topk"][0]
    assert "one topk" in dense["ms"] and "two-stage, slices of 64" in dense["ms"]
    assert "two-stage, slices of 256" not in dense["ms"]  # one slice: not a two-stage TopK
    assert dense["fastest"] in dense["ms"]
    assert "step_error" not in dense and len(dense["step_ab"]["ms"]) == 2
    assert "one topk" in dense["step_ab"]["ms"]
    assert base.picks_decoder is chosen and moe.TOPK_SLICE == slices  # put back
    assert kernels.ENABLED == {"cuda": True}


def test_the_kernels_part_times_the_bags_and_the_kernels():
    pytest.importorskip("triton")
    from benchmarks import profile_gpu
    from engine.sae import kernels

    blocks = dict(kernels.BLOCKS)
    out = {"kernels": []}
    profile_gpu.profile_kernels(dict(d=8, width=32, experts=1, k=2, batch=8), torch.device("cpu"),
                                out, rounds=1, sweep=False)
    assert [r["shape"] for r in out["kernels"]] == ["decode", "scatter", "dots", "project",
                                                    "unit rows", "affine"]
    for row in out["kernels"]:
        assert len(row["ms"]) == 2 and "triton default" in row["ms"]
        assert all(ms > 0 for ms in row["ms"].values()) and row["fastest_triton"] in row["ms"]
    assert kernels.BLOCKS == blocks


@pytest.mark.slow
def test_the_compile_part_times_the_forward_both_ways():
    """Slow: torch.compile builds C++ kernels for the CPU (~a minute on 2 cores)."""
    from benchmarks import profile_gpu
    from engine.models import TINY_MODEL

    out: dict = {}
    profile_gpu.profile_compile(torch.device("cpu"), 2, out, model=TINY_MODEL, calls=1)
    row = out["compile"]
    assert "error" not in row, row
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["compile_s"] > 0


def test_the_tail_ab_part_runs_and_restores_the_defaults():
    """The fused decoder step's A/B (through Triton's interpreter on the CPU, where the fused
    variants run only if the kernels are enabled for the device: here the four passes)."""
    from benchmarks import profile_gpu
    from engine.sae import kernels
    from engine.training import schedule

    blocks = dict(kernels.BLOCKS)
    out = {"tail_ab": []}
    profile_gpu.profile_tail(SMALL, torch.device("cpu"), ["scale e=2"], out, rounds=1)
    row = out["tail_ab"][0]
    assert "error" not in row and "pytorch passes" in row["ms"]
    if kernels.interpreted():
        assert "fused both, 1024 elements, 2 warps" in row["ms"] and len(row["ms"]) == 5
        assert set(row["row_topk"]["ms"]) == {"torch.topk", "row kernel, early exit",
                                              "row kernel, full bisection"}
    assert kernels.BLOCKS == blocks and schedule.FUSED_WEIGHT_STEP is True
    assert schedule.FUSED_ENCODER_ADAM is False


def test_the_fusions_ab_part_runs_and_restores_the_defaults():
    """This round's choices each undone and all together (on the CPU the switches exist but
    the Triton paths they choose between do not run: the script's own bugs are what this
    finds), and the Scale SAE without Feature Scaling beside them."""
    from benchmarks import profile_gpu
    from engine.sae import kernels, moe

    before = (moe.CUDA_SCALING, moe.FUSED_EXPERT_PLAN, moe.ROUND_CENTRED_ROWS,
              moe.CENTRE_GRAD_FROM_PRODUCTS, moe.FUSED_PICKS, moe.FUSED_PICK_GRADS,
              kernels.top_experts_takes, dict(kernels.BLOCKS))
    out = {"fusions_ab": []}
    profile_gpu.profile_fusions(SMALL, torch.device("cpu"), ["topk", "scale e=2"], out, rounds=1)
    topk, scale_row = out["fusions_ab"]
    assert "error" not in topk and "error" not in scale_row
    assert list(topk["ms"]) == ["the default", "x − centre in float32, then cast",
                                "centre's gradient from float32 W",
                                "picks: gathers and index passes"]
    assert {"Feature Scaling: Ŵ formed with autograd", "Feature Scaling: in the segmented sums",
            "Feature Scaling: in the GEMM's epilogue", "routing: torch.topk",
            "row TopK: 64-bit keys", "GEMM layout: sort + passes", "none of them (as at 7e070ee)",
            "x − centre in float32, then cast", "centre's gradient from float32 W",
            "picks: gathers and index passes", "picks' backward: gather, where, scatters",
            "without Feature Scaling", "the default"} == set(scale_row["ms"])
    assert (moe.CUDA_SCALING, moe.FUSED_EXPERT_PLAN, moe.ROUND_CENTRED_ROWS,
            moe.CENTRE_GRAD_FROM_PRODUCTS, moe.FUSED_PICKS, moe.FUSED_PICK_GRADS,
            kernels.top_experts_takes, kernels.BLOCKS) == before

