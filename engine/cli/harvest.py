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
    from ..data.harvest import harvest

    store = harvest(config_from_args(HarvestConfig, args), progress=not args.quiet)
    print(f"harvested {store.split('train').n_tokens + store.split('eval').n_tokens:,} tokens "
          f"at {store.hook} of {store.model_name} into {store.path}")
    return 0
