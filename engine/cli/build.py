"""`moesae build`: the whole pipeline from a TOML config, every step cached."""

from __future__ import annotations

HELP = "the whole pipeline from a TOML config, every step cached"


def add(sub) -> None:
    p = sub.add_parser("build", help=HELP)
    p.add_argument("--config", help="TOML file (default: the offline demo, docs/demo.toml)")
    p.add_argument("--db", help="override the config's DuckDB path")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..build import BuildConfig, build

    cfg = BuildConfig.load(args.config)
    if args.db:
        cfg.db = args.db
    build(cfg, progress=not args.quiet)
    return 0
