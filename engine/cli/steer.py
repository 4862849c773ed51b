"""`moesae steer`: the default and a steered continuation of a prompt, from a build file."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from ..steering.spec import SteerSpec, check_prompt
from .args import add_options

HELP = "default vs steered continuation of a prompt"


def add(sub) -> None:
    parser = sub.add_parser("steer", help=HELP)
    _add_flags(parser)
    parser.set_defaults(func=run)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    """The `moesae steer` flags; sampling and mode flags come from SteerSpec's fields."""
    parser.add_argument("--db", required=True, help="the build file (.duckdb)")
    parser.add_argument(
        "--sae", help="SAE name in the build (default: the build's only MoE SAE, if it has one)"
    )
    parser.add_argument("--prompt", required=True, help="text for the model to continue")
    parser.add_argument(
        "--feature", type=int, action="append", default=[], metavar="F",
        help="feature to steer (repeat for several; pair each with --strength)",
    )
    parser.add_argument(
        "--strength", type=float, action="append", default=[], metavar="S",
        help="strength of the matching --feature, in the SAE's activation units (compare the "
        "feature's max activation); one value applies to every feature",
    )
    add_options(parser, SteerSpec)
    parser.add_argument("--model", help="load this model instead of the one the build records")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")


def spec_from_args(args: argparse.Namespace) -> SteerSpec:
    feats, strengths = list(args.feature or []), list(args.strength or [])
    if feats and not strengths:
        raise ConfigError("Give a --strength for the steered feature(s).")
    if strengths and not feats:
        raise ConfigError("--strength was given without a --feature to steer.")
    if len(strengths) == 1:
        strengths = strengths * len(feats)
    if len(strengths) != len(feats):
        raise ConfigError(
            f"Got {len(feats)} --feature and {len(strengths)} --strength values; give one strength "
            "per feature (or a single one for all)."
        )
    return SteerSpec(
        features=list(zip(feats, strengths, strict=True)),
        mode=args.mode, positions=args.positions, ablate_expert=args.ablate_expert,
        force_expert=args.force_expert, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )


def one_line(text: str) -> str:
    """Continuations on one line each (scripts read `default:`/`steered:` lines)."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..steering.cache import cached_steer, result_key
    from ..steering.run import SteerResult, steer
    from ..steering.target import load_target_sae, pick_sae
    from ..store import SteeringCache, open_db

    spec = spec_from_args(args)
    prompt = check_prompt(args.prompt)
    with open_db(args.db) as store:
        target, note = pick_sae(store, args.sae)
    if note:
        print(note, file=sys.stderr)
    spec.validate(target.width, target.experts)  # fail before loading anything heavy
    sae = load_target_sae(target)
    model_name = args.model or target.model
    cache = None if args.no_cache else SteeringCache(args.db)
    key = result_key(model_name, target.sae, sae, prompt, spec)

    def compute() -> SteerResult:
        loaded = load_model(model_name)
        return steer(loaded, sae, target.hook, prompt, spec)

    result = cached_steer(cache, key, compute)
    if args.json:
        print(json.dumps({**result.to_dict(), "cached": result.cached, "sae": target.sae}))
        return 0
    print(f"default: {one_line(result.default_text)}")
    print(f"steered: {one_line(result.steered_text)}")
    where = "identical" if result.first_diff is None else f"first differ at new token {result.first_diff}"
    print(f"({where}{'; from cache' if result.cached else ''})", file=sys.stderr)
    return 0
