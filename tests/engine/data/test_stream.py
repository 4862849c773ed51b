"""Training straight from the model: the stream's batches are a pure function of (seed, step),
a restored position serves exactly what an uninterrupted stream would, every token of an
epoch is served once, and `moesae train` without --acts trains, keeps a held-out set, and
resumes after kill -9 to bit-identical weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.activation_store import ActivationStore
from engine.data.stream import StreamBatches
from engine.formats import load_sae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def contexts(tiny_model):
    from engine.data.corpus import load_corpus, make_contexts

    return make_contexts(tiny_model, load_corpus("pydoc,fortunes"), context_len=32,
                         n_tokens=4000, seed=0).tokens


def _source(tiny_model, contexts, **kw):
    args = dict(batch_tokens=64, seed=1, device=CPU, buffer_tokens=600, refill_fraction=0.5,
                batch_contexts=8, drop_outliers=True, norm_scale=None, describe={})
    args.update(kw)
    return StreamBatches(tiny_model, tiny_model.default_hook, contexts, **args)


def test_same_seed_same_batches_and_a_restored_position_continues_exactly(tiny_model, contexts):
    a = _source(tiny_model, contexts)
    assert a.p == 3  # refill 1/2: each phase mixes three segments
    first = [a.batch(s).clone() for s in range(12)]
    state = a.state_dict()
    rest = [a.batch(s).clone() for s in range(12, 30)]
    b = _source(tiny_model, contexts)
    assert all(torch.equal(x, b.batch(s)) for s, x in enumerate(first))
    c = _source(tiny_model, contexts)
    c.load_state_dict(state)
    for s, x in enumerate(rest, start=12):
        assert torch.equal(x, c.batch(s)), s
    assert a.norm_scale == b.norm_scale == c.norm_scale
    with pytest.raises(RuntimeError, match="in order"):
        c.batch(5)


def test_every_token_of_an_epoch_is_served_once(tiny_model, contexts):
    src = _source(tiny_model, contexts, drop_outliers=False, refill_fraction=2 / 3)
    assert src.p == 2
    body = contexts.shape[1] - 1
    per_epoch = len(contexts) * body
    rows = torch.cat([src.batch(s) for s in range(per_epoch // 64)])
    # the model's activations of all contexts, as rows, against what was served
    with torch.no_grad():
        acts = tiny_model.activations(torch.from_numpy(contexts.astype(np.int64)),
                                      tiny_model.default_hook)[:, 1:].reshape(-1, tiny_model.d_model)
    want = (acts.half().float() * src.norm_scale).double()
    served = rows.double()
    # same multiset: compare sorted row sums and the total
    assert served.shape[0] <= want.shape[0]
    assert served.shape[0] >= want.shape[0] - 2 * src.seg_contexts * body - 64
    a = torch.sort(served.sum(1)).values
    b = torch.sort(want.sum(1)).values
    assert torch.isin(a.round(decimals=3), b.round(decimals=3)).float().mean() > 0.999


def _train_cmd(out, steps=60, extra=()):
    return [sys.executable, "-m", "engine.cli", "--quiet", "train", "--model", "tiny-random",
            "--corpus", "pydoc,fortunes", "--tokens", "6000", "--context-len", "32",
            "--out", str(out), "--arch", "scale", "--width", "128", "--experts", "4",
            "--active", "2", "--k", "8", "--steps", str(steps), "--batch-tokens", "128",
            "--buffer-tokens", "1024", "--heldout-tokens", "400", "--checkpoint-every", "10",
            "--log-every", "10", "--device", "cpu", *extra]


def test_train_from_the_model_resumes_after_kill_9_to_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out, 200), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    state = out / "state" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 20:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_train_cmd(out, 200), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run(_train_cmd(tmp_path / "ref", 200), env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    a, meta = load_sae(out / "final")
    b, _ = load_sae(tmp_path / "ref" / "final")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # bit-identical on the CPU
    held = ActivationStore(meta["acts"])
    assert held.split("eval").n_tokens >= 300 and Path(meta["acts"]) == (out / "heldout").resolve()


def test_acts_and_model_together_is_one_sentence(tmp_path):
    proc = subprocess.run([*_train_cmd(tmp_path / "r"), "--acts", str(tmp_path)], capture_output=True,
                          text=True, env=dict(os.environ))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "either --acts" in proc.stderr


def test_a_buffer_larger_than_memory_is_one_sentence(tmp_path, monkeypatch):
    from engine.data import batches
    from engine.errors import ConfigError

    monkeypatch.setattr(batches, "_available_host_bytes", lambda: 10 * 2**20)  # 10 MiB free
    proc_args = ["--buffer-tokens", "1000000"]
    from engine.cli.main import main

    rc = main(["--quiet", *_train_cmd(tmp_path / "r")[4:], *proc_args])
    assert rc == 2
    with pytest.raises(ConfigError, match="does not fit in the .* available; lower --buffer-tokens"):
        main(["--debug", "--quiet", *_train_cmd(tmp_path / "r")[4:], *proc_args])
