"""Training with the fast kernels against the plain reference, in every precision this machine
has (fp32 and bf16 on a CPU; tf32 too on an Ampere-or-newer GPU), and the one sentence a
precision the hardware lacks ends in."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import ConfigError
from engine.options import set_flat
from engine.runtime import RuntimeConfig, available_precisions, resolve
from engine.training.config import TrainConfig
from engine.training.trainer import train

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _final_fvu(run) -> float:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "train"][-1]["fvu"]


@pytest.mark.parametrize("precision", available_precisions(DEVICE))
@pytest.mark.parametrize("arch", ["topk", "scale"])
def test_fifty_steps_fast_equal_reference(tiny_acts, tmp_path, precision, arch):
    fvu = {}
    for kernels in ("reference", "fast"):
        cfg = set_flat(TrainConfig(), dict(
            acts=str(tiny_acts.path), out=str(tmp_path / kernels), arch=arch, width=128,
            experts=4, active=2, k=8, steps=50, batch_tokens=256, checkpoint_every=50,
            log_every=10, device=str(DEVICE), precision=precision, kernels=kernels,
            dead_tokens=2048,  # features die within the run, so AuxK is exercised too
        ))
        fvu[kernels] = _final_fvu(train(cfg, progress=False))
    assert fvu["fast"] == pytest.approx(fvu["reference"], rel=0.02 if precision == "bf16" else 1e-3)


def test_a_precision_the_hardware_lacks_is_one_sentence():
    if "tf32" in available_precisions(DEVICE):
        pytest.skip("this machine has tf32")
    with pytest.raises(ConfigError) as e:
        resolve(RuntimeConfig(device=str(DEVICE), precision="tf32"))
    msg = str(e.value)
    assert "tf32 is not available" in msg and "available: fp32, bf16" in msg and msg.count(".") == 1
