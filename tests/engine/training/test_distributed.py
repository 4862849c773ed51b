"""Data-parallel training through torchrun (gloo on the CPU): two processes with the same
global batch train the same SAE as one process, up to float rounding; a batch that does not
split is one sentence; kill -9 of the whole job, then the same command, resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.formats import load_sae


def _args(acts, out, steps=30, batch=256):
    return ["train", "--acts", str(acts), "--out", str(out), "--arch", "scale", "--width", "128",
            "--experts", "4", "--active", "2", "--k", "8", "--steps", str(steps),
            "--batch-tokens", str(batch), "--checkpoint-every", "10", "--log-every", "5",
            "--device", "cpu", "--dead-tokens", "2048"]


def _run(args, procs: int, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if procs == 1:
        cmd = [sys.executable, "-m", "engine.cli", "--quiet", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={procs}", "-m", "engine.cli", "--quiet", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)


def _log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def test_two_processes_train_the_same_sae_as_one(tiny_acts, tmp_path):
    one = _run(_args(tiny_acts.path, tmp_path / "one"), 1)
    assert one.returncode == 0, one.stderr
    two = _run(_args(tiny_acts.path, tmp_path / "two"), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = load_sae(tmp_path / "one" / "final")
    b, _ = load_sae(tmp_path / "two" / "final")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-3), name
    la = [r for r in _log(tmp_path / "one") if r["kind"] == "train"]
    lb = [r for r in _log(tmp_path / "two") if r["kind"] == "train"]
    assert [r["step"] for r in la] == [r["step"] for r in lb]  # rank 0 alone logs
    for ra, rb in zip(la, lb, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=0.01)
        assert rb["mse"] == pytest.approx(ra["mse"], rel=0.01)


def test_a_batch_that_does_not_split_is_one_sentence(tiny_acts, tmp_path):
    proc = _run(_args(tiny_acts.path, tmp_path / "r", batch=255), 2)
    assert proc.returncode != 0
    assert "error: The global batch of 255 tokens does not split evenly across 2 processes" in proc.stderr
    # torchrun reports a failed worker with a traceback of its own; ours printed one sentence
    assert 'File "/' not in proc.stderr.split("ChildFailedError")[0] or "engine/" not in proc.stderr


def test_kill_9_of_the_whole_job_then_the_same_command_resumes(tiny_acts, tmp_path):
    out = tmp_path / "killed"
    args = _args(tiny_acts.path, out, steps=300)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "engine.cli", "--quiet", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = out / "state" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 20:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    done = _run(args, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in _log(out) if r["kind"] == "train"]
    assert steps == list(range(5, 301, 5)) and killed_at < 300


def test_nccl_on_a_cpu_is_one_sentence(monkeypatch):
    from engine.errors import ConfigError
    from engine.training.distributed import from_environment

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="nccl needs CUDA GPUs"):
        from_environment("cpu", "nccl")
