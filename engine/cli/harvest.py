"""`moesae harvest`: activations at one hook → memory-mapped shards + manifest (resumable)."""

from __future__ import annotations

from ..data.harvest import HarvestConfig
from .args import add_options, config_from_args

HELP = "store activations at one hook for a corpus"


def add(sub) -> None:
    p = sub.add_parser("harvest", help=HELP)
    add_options(p, HarvestConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.harvest import describe_timings, harvest

    timings: dict = {}
    store = harvest(config_from_args(HarvestConfig, args), progress=not args.quiet, timings=timings)
    print(f"harvested {store.split('train').n_tokens + store.split('eval').n_tokens:,} tokens "
          f"at {store.hook} of {store.model_name} into {store.path}")
    if timings.get("forward"):  # something was computed (not a finished harvest found again)
        print(f"  after loading the model, {describe_timings(timings)}")
    return 0
