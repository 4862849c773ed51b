"""What a user does at the command line: harvest → train → eval → analyze → build on a tiny
config, and every bad input ending in one sentence and a non-zero exit (no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.paths import data_dir

TINY = ["--model", "tiny-random"]
SAE = ["--width", "64", "--experts", "4", "--k", "8", "--batch-tokens", "256", "--device", "cpu"]


def moesae(*args, check: bool | None = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOESAE_DATA=str(data_dir()), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "--quiet", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check is True:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_sentence(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle.lower() in err.lower(), err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole pipeline through the real command, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    acts = root / "acts"
    harvested = moesae("harvest", *TINY, "--tokens", 4000, "--context-len", 64, "--out", acts)
    (root / "harvest.out").write_text(harvested.stdout)
    runs = {}
    for arch in ("switch", "scale"):
        runs[arch] = root / arch
        moesae("train", "--acts", acts, "--arch", arch, *SAE, "--steps", 40, "--out", runs[arch])
    return root, acts, runs


def test_harvest_says_what_it_stored_and_where_its_time_went(pipeline):
    root, acts, _ = pipeline
    first, second = (root / "harvest.out").read_text().splitlines()[-2:]
    assert first.startswith("harvested ") and str(acts) in first
    # which parts are named depends on how long each took (those under 0.05 s are left out)
    assert re.fullmatch(r"  after loading the model, \d+\.\d s: .+ \d+\.\d s", second), second
    again = moesae("harvest", *TINY, "--tokens", 4000, "--context-len", 64, "--out", acts)
    assert again.stdout.splitlines()[-1].startswith("harvested ")  # found complete: no times


def test_eval_json_has_method_metric_names(pipeline):
    _, _, runs = pipeline
    out = moesae("eval", runs["scale"], "--json", "--max-tokens", 2000)
    metrics = json.loads(out.stdout)
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_recovered",
                "kl_div", "redundancy_ratio_0.7", "redundancy_ratio_0.8", "redundancy_ratio_0.9",
                "mean_max_cos", "redundancy_within_0.9", "redundancy_across_0.9",
                "expert_load_top1", "expert_load_entropy", "expert_similarity", "omega"):
        assert key in metrics, key
    assert metrics["l0"] == pytest.approx(8, abs=0.5)
    assert metrics["fvu"] == pytest.approx(1 - metrics["explained_variance"])
    assert len(metrics["omega"]) == 4 and len(metrics["expert_similarity"]) == 4


def test_analyze_then_steer_from_the_command_line(pipeline):
    root, _, runs = pipeline
    db = root / "both.duckdb"
    moesae("analyze", runs["switch"], runs["scale"], "--db", db, "--contexts", 20,
           "--eval-tokens", 1000, "--name", "Switch (ours)", "--name", "Scale e=2")
    from engine.store import open_db

    store = open_db(db)
    assert sorted(s["sae"] for s in store.list_saes()) == ["Scale e=2", "Switch (ours)"]
    assert store.comparisons("Scale e=2") == ["Switch (ours)"]
    assert_one_sentence(moesae("analyze", runs["switch"], runs["scale"], "--db", root / "x.duckdb",
                               "--name", "only one", check=False), "one --name per run")
    out = moesae("steer", "--db", db, "--sae", "Scale e=2", "--prompt", "The function returns",
                 "--feature", 3, "--strength", 40, "--max-new-tokens", 5)
    lines = out.stdout.splitlines()
    assert any(x.startswith("default:") for x in lines)
    assert any(x.startswith("steered:") for x in lines)


def test_export_then_import_round_trip(pipeline, tmp_path):
    root, acts, _ = pipeline
    run = root / "topk"
    moesae("train", "--acts", acts, "--arch", "topk", *SAE, "--steps", 10, "--out", run)
    moesae("export", run, "--out", tmp_path / "saelens")
    assert (tmp_path / "saelens" / "sae_weights.safetensors").exists()
    moesae("import", tmp_path / "saelens", "--out", tmp_path / "back")
    out = moesae("eval", tmp_path / "back", "--acts", acts, "--no-ce", "--json", "--max-tokens", 1000)
    ref = moesae("eval", run, "--no-ce", "--json", "--max-tokens", 1000)
    assert json.loads(out.stdout)["mse"] == pytest.approx(json.loads(ref.stdout)["mse"], rel=1e-4)


# -- bad input: one sentence, non-zero exit, nothing half-written --------------------------------
def test_unknown_model(tmp_path):
    assert_one_sentence(moesae("harvest", "--model", str(tmp_path / "no-such-model"), "--tokens", 100,
                               "--out", tmp_path / "a", check=False), "model")
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_unknown_hook_lists_nearest(tmp_path):
    proc = moesae("harvest", *TINY, "--hook", "blocks.1.hook_resid_pots", "--tokens", 100,
                  "--out", tmp_path / "a", check=False)
    assert_one_sentence(proc, "unknown hook", "blocks.1.hook_resid_post")


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_sentence(moesae("harvest", *TINY, "--corpus", empty, "--tokens", 100,
                               "--out", tmp_path / "a", check=False), "empty")
    assert not (tmp_path / "a").exists()  # nothing left behind


def test_unknown_hub_model_is_one_sentence_without_hub_retries(tmp_path):
    proc = moesae("eval", tmp_path, "--model", "someone/some-model", check=False)
    assert_one_sentence(proc)
    proc = moesae("harvest", "--model", "someone/some-model", "--tokens", 100, "--out",
                  tmp_path / "h", check=False)
    assert_one_sentence(proc, "hub cannot be reached")
    assert not proc.stderr.rstrip().endswith("…).") or "…" not in proc.stderr


def test_help_shows_real_defaults_only():
    out = moesae("train", "--help").stdout
    assert "(default: )" not in out and "model default" not in out and "(default: None)" not in out
    assert "(default: 4608)" in out


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--k", "40", "--active", "2"], "exceeds"),
        (["--active", "5"], "cannot exceed"),
        (["--width", "66"], "divisible"),
        (["--arch", "dense"], "unknown architecture"),
    ],
)
def test_impossible_sae_configs(pipeline, tmp_path, flags, needle):
    _, acts, _ = pipeline
    args = ["--acts", acts, "--arch", "scale", "--width", "64", "--experts", "4", "--k", "8",
            "--steps", "5", "--batch-tokens", "64", "--out", tmp_path / "r"]
    proc = moesae("train", *args, *flags, check=False)
    assert_one_sentence(proc, needle)
    assert not (tmp_path / "r" / "final").exists()


def test_missing_and_corrupt_checkpoint(pipeline, tmp_path):
    assert_one_sentence(moesae("eval", tmp_path / "nothing", "--no-ce", check=False), "nothing")
    _, _, runs = pipeline
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text((runs["scale"] / "final" / "cfg.json").read_text())
    (bad / "sae.safetensors").write_bytes(b"\x00garbage")
    assert_one_sentence(moesae("eval", bad, "--no-ce", check=False), "sae.safetensors")


def test_missing_and_corrupt_activation_shard(pipeline, tmp_path):
    import shutil

    _, acts, _ = pipeline
    copy = tmp_path / "acts"
    shutil.copytree(acts, copy)
    shard = sorted(copy.glob("train-*.npy"))[0]
    shard.write_bytes(b"not a numpy file")
    proc = moesae("train", "--acts", copy, "--arch", "topk", *SAE, "--steps", 5, "--out",
                  tmp_path / "r", check=False)
    assert_one_sentence(proc)
    assert_one_sentence(moesae("train", "--acts", tmp_path / "none", "--arch", "topk", *SAE,
                               "--out", tmp_path / "r2", check=False))


def test_sae_width_must_match_model(pipeline, tmp_path):
    """An SAE trained for d=64 cannot be evaluated against a model of another width."""
    _, _, runs = pipeline
    from engine.formats import load_sae, save_sae
    from engine.sae import SAEConfig, build_sae

    _, meta = load_sae(runs["scale"] / "final")
    wrong = build_sae(SAEConfig(arch="topk", d_in=32, width=64, k=8))
    save_sae(wrong, tmp_path / "wrong", dict(meta, d_in=32))
    proc = moesae("eval", tmp_path / "wrong", "--max-tokens", 500, check=False)
    assert_one_sentence(proc, "d_in")


def test_nan_activations_are_refused(pipeline, tmp_path):
    import shutil

    _, acts, _ = pipeline
    copy = tmp_path / "acts"
    shutil.copytree(acts, copy)
    for shard in sorted(copy.glob("train-*.npy")):
        if shard.name.endswith((".idx.npy", ".norms.npy")):
            continue
        arr = np.load(shard, mmap_mode="r+")
        arr[:] = np.nan
        arr.flush()
    proc = moesae("train", "--acts", copy, "--arch", "topk", *SAE, "--steps", 5, "--out",
                  tmp_path / "r", check=False)
    assert_one_sentence(proc, "nan")


def test_build_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("tokens = \n")
    assert_one_sentence(moesae("build", "--config", bad, check=False), "toml")
    bad.write_text("tokenz = 5\n")
    assert_one_sentence(moesae("build", "--config", bad, check=False), "unknown key")
    assert_one_sentence(moesae("serve", "--db", tmp_path / "none.duckdb", check=False), "does not exist")
    junk = tmp_path / "junk.duckdb"
    junk.write_text("hello")
    assert_one_sentence(moesae("serve", "--db", junk, check=False))


def test_build_end_to_end_then_noop(tmp_path):
    cfg = tmp_path / "tiny.toml"
    db = tmp_path / "tiny.duckdb"
    cfg.write_text(f'''
db = "{db}"
model = "tiny-random"
tokens = 3000
context_len = 64
width = 64
experts = 4
k = 8
steps = 30
batch_tokens = 256
eval_tokens = 1000
analysis_contexts = 20

[[sae]]
name = "switch"
arch = "switch"

[[sae]]
name = "scale"
arch = "scale"
active = 2
''')
    first = moesae("build", "--config", cfg)
    assert "running" in first.stdout
    from engine.store import open_db

    store = open_db(db)
    assert sorted(s["sae"] for s in store.list_saes()) == ["scale", "switch"]
    stamp = Path(db).stat().st_mtime_ns
    second = moesae("build", "--config", cfg)
    assert "running" not in second.stdout, second.stdout
    assert Path(db).stat().st_mtime_ns == stamp
