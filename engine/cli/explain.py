"""`moesae explain`: short explanations of features by a chat-completions server."""

from __future__ import annotations

from ..explain import ExplainConfig
from .args import add_options, config_from_args

HELP = "explain features with an OpenAI-compatible chat server (written to the build's notes)"


def add(sub) -> None:
    p = sub.add_parser("explain", help=HELP)
    p.add_argument("--db", required=True, help="DuckDB file made by build/analyze")
    p.add_argument("--sae", required=True, help="the SAE's name in the build")
    add_options(p, ExplainConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..explain import explain

    out = explain(args.db, args.sae, config_from_args(ExplainConfig, args), progress=not args.quiet)
    print(f"explained {out['explained']} features ({out['skipped']} already explained, "
          f"{out['silent']} never fire); written to {out['notes']}")
    return 0
