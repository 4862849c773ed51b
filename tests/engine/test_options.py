"""engine.options: nested configs seen as flat options, for the CLI and for build files."""

from __future__ import annotations

import argparse

import pytest

from engine.build import BuildConfig
from engine.cli.args import add_options, config_from_args
from engine.errors import ConfigError
from engine.options import get, names, options, set_flat, to_flat
from engine.sae.config import SAEConfig
from engine.training.config import TrainConfig


def test_nested_fields_are_flat_options_in_field_order():
    flat = [o.name for o in options(TrainConfig)]
    assert flat[:4] == ["acts", "out", "arch", "width"]
    assert "d_in" not in flat  # derived from the data, never an option
    width = next(o for o in options(TrainConfig) if o.name == "width")
    assert width.path == ("sae", "width") and width.kind is int and width.doc == "M, total features."
    lr = next(o for o in options(TrainConfig) if o.name == "lr")
    assert lr.optional and lr.kind is float


def test_every_option_is_defined_once_per_tree():
    """A flat name occurs several times in a build only as one field nested in several
    places (--device, --precision), or where the build deliberately shares one value (the
    seed of the harvest and of training) or sets it itself (out)."""
    fields_of: dict[str, set[int]] = {}
    for o in options(BuildConfig):
        fields_of.setdefault(o.name, set()).add(id(o.field))
    assert {n for n, f in fields_of.items() if len(f) > 1} == {"seed", "out"}
    repeated = {o.name for o in options(BuildConfig)} - {"seed", "out"}
    assert {"device", "precision"} <= repeated


def test_set_flat_sets_every_place_and_checks_types():
    cfg = set_flat(BuildConfig(), {"seed": 3, "width": 64, "lr": 1})
    assert cfg.harvest.source.seed == cfg.train.seed == cfg.train.source.seed == 3
    assert cfg.train.sae.width == 64 and get(cfg, "width") == 64
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="Unknown option"):
        set_flat(TrainConfig(), {"widht": 3})
    with pytest.raises(ConfigError, match="width .*must be an int"):
        set_flat(TrainConfig(), {"width": "wide"})
    with pytest.raises(ConfigError, match="must be a bool"):
        set_flat(TrainConfig(), {"feature_scaling": 1})
    assert set_flat(TrainConfig(), {"lr": None}).lr is None


def test_to_flat_round_trips():
    cfg = set_flat(TrainConfig(), {"arch": "switch", "k": 8, "steps": 7})
    again = set_flat(TrainConfig(), to_flat(cfg))
    assert again == cfg
    assert names(SAEConfig) == {"arch", "width", "experts", "active", "k", "feature_scaling",
                                "scaling_form", "expert_weighting"}


def test_cli_flags_come_from_the_fields():
    p = argparse.ArgumentParser()
    add_options(p, TrainConfig)
    args = p.parse_args(["--arch", "topk", "--width", "64", "--no-feature-scaling", "--lr", "none"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.sae == SAEConfig(arch="topk", width=64, feature_scaling=False)
    assert cfg.lr is None and cfg.steps == TrainConfig().steps
    help_ = p.format_help()
    assert "(default: 4608)" in help_ and "(default: )" not in help_ and "default: None" not in help_


def test_aliases_keep_old_flag_spellings():
    from engine.metrics.evaluate import EvalConfig

    p = argparse.ArgumentParser()
    add_options(p, EvalConfig)
    assert config_from_args(EvalConfig, p.parse_args(["--max-tokens", "5"])).eval_tokens == 5
    assert config_from_args(EvalConfig, p.parse_args(["--eval-tokens", "6"])).eval_tokens == 6
