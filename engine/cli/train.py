"""`moesae train`: one SAE on harvested activations (resumable after kill -9)."""

from __future__ import annotations

from ..training.config import TrainConfig
from .args import add_options, config_from_args

HELP = "train one SAE on harvested activations or straight from the model (resumable)"


def add(sub) -> None:
    p = sub.add_parser("train", help=HELP)
    add_options(p, TrainConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..training.trainer import train

    cfg = config_from_args(TrainConfig, args)
    streamed = [f"--{n}" for n in ("model", "hook", "corpus") if getattr(args, n, None) is not None]
    if cfg.acts and streamed:
        raise ConfigError(
            f"Give either --acts (a harvest to train on) or {' / '.join(streamed)} (activations "
            "computed from the model while training), not both."
        )
    run_path = train(cfg, progress=not args.quiet)
    print(f"trained {cfg.sae.arch} SAE: {run_path / 'final'}")
    return 0
