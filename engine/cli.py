"""The `moesae` command. Flags of harvest/train are generated from their config dataclasses,
so each option has one source of truth (its field, default and docstring)."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

from .errors import UserError


# -- dataclass → argparse -----------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


_TYPES = {"int": int, "float": float, "str": str}


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_ = docs.get(f.name, "")
        ann = str(f.type).replace(" ", "")
        if ann == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_
            )
            continue
        base = ann.split("|")[0]
        typ = _TYPES.get(base, str)
        shown = "model default" if default is None else default
        parser.add_argument(flag, type=typ, default=default, help=f"{help_} (default: {shown})")


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


# -- verbs ----------------------------------------------------------------------------------------
def cmd_harvest(args) -> int:
    from .activations import HarvestConfig, harvest

    cfg = dataclass_from_args(HarvestConfig, args)
    store = harvest(cfg, progress=not args.quiet)
    print(f"harvested {store.split('train').n_tokens + store.split('eval').n_tokens:,} tokens "
          f"at {store.hook} of {store.model_name} into {store.path}")
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    cfg = dataclass_from_args(TrainConfig, args)
    run = train(cfg, progress=not args.quiet)
    print(f"trained {cfg.arch} SAE: {run / 'final'}")
    return 0


def _resolve_run(path: str) -> Path:
    """Accept a run folder (uses its final/) or a checkpoint folder."""
    p = Path(path)
    if (p / "final" / "cfg.json").exists():
        return p / "final"
    return p


def cmd_eval(args) -> int:
    from .activations import ActivationStore
    from .checkpoint import check_compatible, load_sae
    from .evaluate import evaluate, format_table
    from .models import load_model

    sae, meta = load_sae(_resolve_run(args.run))
    acts_dir = args.acts or meta.get("acts")
    if not acts_dir:
        raise UserError("This SAE does not record its activation folder; pass --acts DIR.")
    acts = ActivationStore(acts_dir)
    model = None
    if not args.no_ce:
        model = load_model(args.model or meta.get("model") or acts.model_name)
        check_compatible(sae, model.d_model, model.name)
    metrics = evaluate(sae, acts, model, max_tokens=args.max_tokens, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table({Path(args.run).name: metrics}))
    return 0


def cmd_import(args) -> int:
    from .checkpoint import import_saelens, save_sae

    sae, meta = import_saelens(args.src)
    save_sae(sae, Path(args.out), meta)
    print(f"imported {args.src} ({sae.cfg.width} features, d_in {sae.cfg.d_in}) → {args.out}")
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_saelens, load_sae

    sae, meta = load_sae(_resolve_run(args.run))
    export_saelens(sae, Path(args.out), meta)
    print(f"exported to SAELens format: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .activations import HarvestConfig
    from .train import TrainConfig

    p = argparse.ArgumentParser(
        prog="moesae",
        description="Train, evaluate and explore Mixture-of-Experts sparse autoencoders.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    h = sub.add_parser("harvest", help="store activations at one hook for a corpus")
    add_dataclass_args(h, HarvestConfig)
    h.set_defaults(func=cmd_harvest)

    t = sub.add_parser("train", help="train one SAE on harvested activations (resumable)")
    add_dataclass_args(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="METHOD.md §4 metrics on held-out tokens")
    e.add_argument("run", help="run folder (or checkpoint folder)")
    e.add_argument("--acts", help="activation folder (default: the one it was trained on)")
    e.add_argument("--model", help="model for CE/KL (default: the one it was trained on)")
    e.add_argument("--max-tokens", type=int, default=200_000, help="held-out tokens to use")
    e.add_argument("--no-ce", action="store_true", help="skip CE loss recovered / KL (no model)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("import", help="import an SAELens SAE folder")
    i.add_argument("src")
    i.add_argument("--out", required=True)
    i.set_defaults(func=cmd_import)

    x = sub.add_parser("export", help="export a dense TopK SAE to SAELens format")
    x.add_argument("run")
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, full traceback only with --debug
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
