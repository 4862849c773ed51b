"""The trainer: it learns, resumes exactly after kill -9, stops cleanly on NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.data.batches import batch_indices, harvest_batches
from engine.errors import ConfigError, TrainingError
from engine.formats import load_sae
from engine.options import set_flat
from engine.training.config import TrainConfig
from engine.training.schedule import lr_at
from engine.training.trainer import train


def small_cfg(acts, out, **kw) -> TrainConfig:
    base = dict(acts=str(acts), out=str(out), arch="scale", width=128, experts=4, active=2, k=8,
                steps=60, batch_tokens=256, checkpoint_every=20, log_every=10, device="cpu")
    base.update(kw)
    return set_flat(TrainConfig(), base)


def read_log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def test_lr_schedule_constant_then_linear_decay():
    assert lr_at(0, 100, 1.0, 0.2) == 1.0
    assert lr_at(79, 100, 1.0, 0.2) == 1.0
    assert lr_at(80, 100, 1.0, 0.2) == pytest.approx(1.0)
    assert lr_at(90, 100, 1.0, 0.2) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 0.2) == 0.0


def test_batches_are_a_function_of_seed_and_step():
    a = batch_indices(1000, 64, 17, 3)
    assert (a == batch_indices(1000, 64, 17, 3)).all()
    assert len(set(a.tolist())) == 64
    epoch = [batch_indices(1000, 100, s, 0) for s in range(10)]
    assert len(set(int(i) for b in epoch for i in b)) == 1000  # one epoch sees every token once


@pytest.mark.parametrize("arch", ["topk", "switch", "scale"])
def test_training_lowers_reconstruction_error(tiny_acts, tmp_path, arch):
    run = train(small_cfg(tiny_acts.path, tmp_path / arch, arch=arch), progress=False)
    rows = [r for r in read_log(run) if r["kind"] == "train"]
    assert rows[-1]["step"] == 60
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert {"loss", "mse", "fvu", "l0", "dead_fraction", "tokens_per_s"} <= rows[-1].keys()
    if arch != "topk":
        assert 0 < rows[-1]["expert_load_entropy"] <= 1
    if arch == "scale":
        assert "omega_mean" in rows[-1]
    red = [r for r in read_log(run) if r["kind"] == "redundancy"]
    assert [r["step"] for r in red] == [20, 40, 60]
    sae, meta = load_sae(run / "final")
    assert meta["hook"] == tiny_acts.hook
    assert float(sae.input_scale) == pytest.approx(tiny_acts.norm_scale)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_second_run_is_a_noop_and_other_config_is_refused(tiny_acts, tmp_path):
    cfg = small_cfg(tiny_acts.path, tmp_path / "r", steps=20)
    train(cfg, progress=False)
    before = (tmp_path / "r" / "log.jsonl").read_text()
    train(cfg, progress=False)
    assert (tmp_path / "r" / "log.jsonl").read_text() == before
    with pytest.raises(ConfigError, match="different configuration"):
        train(small_cfg(tiny_acts.path, tmp_path / "r", steps=20, k=4), progress=False)


def test_nan_stops_with_step_number_and_keeps_last_checkpoint(tiny_acts, tmp_path):
    real = harvest_batches(tiny_acts, 256, 0, torch.device("cpu"))

    class Poisoned:  # a batch source whose step 27 is finite but overflows the squared error
        def __getattr__(self, name):
            return getattr(real, name)

        def batch(self, step):
            x = real.batch(step)
            return x * 1e30 if step == 27 else x

    with pytest.raises(TrainingError, match="step 27.*step 20"):
        train(small_cfg(tiny_acts.path, tmp_path / "nan"), progress=False, source=Poisoned())
    state = json.loads((tmp_path / "nan" / "state" / "state.json").read_text())
    assert state["step"] == 20
    assert not (tmp_path / "nan" / "final").exists()


def test_kill_9_then_same_command_resumes_to_identical_weights(tiny_acts, tmp_path):
    """A real `moesae train` process is killed with SIGKILL after its first checkpoint; the
    same command then finishes the same number of steps, with the weights an uninterrupted
    run reaches (batches depend only on seed and step; Adam state is checkpointed)."""
    out = tmp_path / "killed"
    args = ["--acts", str(tiny_acts.path), "--out", str(out), "--arch", "scale", "--width", "128",
            "--experts", "4", "--active", "2", "--k", "8", "--steps", "400", "--batch-tokens",
            "128", "--checkpoint-every", "10", "--log-every", "10", "--device", "cpu"]
    cmd = [sys.executable, "-m", "engine.cli", "--quiet", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "state" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 10 <= killed_at < 400
    assert not (out / "final").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed {out} from step {killed_at:,} of 400" in done.stderr
    rows = [r for r in read_log(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(10, 401, 10))  # no step lost or repeated

    ref_cfg = small_cfg(tiny_acts.path, tmp_path / "ref", steps=400, batch_tokens=128,
                        checkpoint_every=10, log_every=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(ref_cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, _ = load_sae(out / "final")
    b, _ = load_sae(ref / "final")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_the_authors_recipe_raw_inputs_and_their_lb_weight(tiny_acts, tmp_path):
    """--no-normalise trains on raw activations (input scale 1) and --lb-weight-raw takes α in
    the authors' units; both are recorded in the run's identity."""
    cfg = small_cfg(tiny_acts.path, tmp_path / "authors", steps=20, auxk_alpha=0.0,
                    normalise=False, lb_weight_raw=3.0 * 64)
    run = train(cfg, progress=False)
    sae, meta = load_sae(run / "final")
    assert float(sae.input_scale) == 1.0
    assert meta["train_config"]["normalise"] is False and meta["train_config"]["lb_weight_raw"] == 192.0
    rows = [r for r in read_log(run) if r["kind"] == "train"]
    assert rows[-1]["auxk_loss"] == 0.0 and rows[-1]["fvu"] < rows[0]["fvu"]
