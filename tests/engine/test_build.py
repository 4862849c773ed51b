"""`moesae build` beyond the demo: training straight from the model with one pass feeding every
SAE, the paper's configuration files, and the measured CPU budget that refuses an impossible
build before it starts."""

from __future__ import annotations

import pytest

from engine.build import BuildConfig, build
from engine.errors import ConfigError
from engine.store import open_db
from engine.training.run_folder import RunFolder


def test_paper_configs_name_the_papers_twelve_saes():
    for path, width in (("docs/paper.toml", 24576), ("docs/paper-cpu.toml", 4608)):
        cfg = BuildConfig.load(path)
        assert cfg.train.sae.width == width and len(cfg.saes) == 12
        seen = {(s["arch"], s["active"], s["k"]) for s in cfg.saes}
        for k in (2, 8, 32):
            assert {("switch", 1, k), ("scale", 1, k), ("scale", 2, k), ("scale", 8, k)} <= seen


def test_an_impossible_cpu_build_is_refused_before_it_starts(tmp_path):
    cfg_file = tmp_path / "big.toml"
    cfg_file.write_text(
        f'db = "{tmp_path / "big.duckdb"}"\nmodel = "tiny-random"\nwidth = 16384\nexperts = 16\n'
        "steps = 1000000\nbatch_tokens = 4096\nmax_cpu_hours = 0.5\n"
        '[[sae]]\nname = "s"\narch = "scale"\nactive = 2\n'
    )
    with pytest.raises(ConfigError, match=r"would train for about \d+ hours on this CPU"):
        build(BuildConfig.load(cfg_file), progress=False, log=lambda *a: None)
    assert not (tmp_path / "acts").exists()  # refused before anything was harvested


def test_a_streamed_build_trains_every_sae_from_one_pass(tmp_path):
    cfg_file = tmp_path / "stream.toml"
    cfg_file.write_text(
        f'db = "{tmp_path / "s.duckdb"}"\nmodel = "tiny-random"\ncorpus = "pydoc,fortunes"\n'
        "tokens = 5000\ncontext_len = 32\nwidth = 64\nexperts = 4\nk = 8\nsteps = 20\n"
        "batch_tokens = 128\nbuffer_tokens = 1024\nheldout_tokens = 600\neval_tokens = 600\n"
        "analysis_contexts = 10\nstream = true\numap = false\n"
        '[[sae]]\nname = "switch"\narch = "switch"\n[[sae]]\nname = "scale"\narch = "scale"\nactive = 2\n'
    )
    lines: list[str] = []
    db = build(BuildConfig.load(cfg_file), progress=False, log=lines.append)
    assert any("streams from the model" in line for line in lines)
    assert not (tmp_path / "acts").exists()
    with open_db(db) as store:
        assert sorted(s["sae"] for s in store.list_saes()) == ["scale", "switch"]
        info = store.sae_info("scale")
        assert info.metrics["mse"] is not None and info.n_tokens > 0
        assert "streams" in info.config["acts"]  # eval and analysis read the shared held-out set
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(RunFolder(r).is_finished() for r in runs)
