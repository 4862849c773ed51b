"""`moesae demo`: build the offline demo (cached) and open the explorer on it."""

from __future__ import annotations

from . import serve

HELP = "build the default demo (cached) and open the explorer"


def add(sub) -> None:
    p = sub.add_parser("demo", help=HELP)
    p.add_argument("--config", help="TOML file (default: the offline demo, docs/demo.toml)")
    p.add_argument("--no-serve", action="store_true", help="build only")
    serve.add_address(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..build import BuildConfig, build

    db = build(BuildConfig.load(args.config), progress=not args.quiet)
    if args.no_serve:
        return 0
    args.db = str(db)
    return serve.run(args)
