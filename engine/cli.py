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
        help_ = docs.get(f.name) or f.metadata.get("help", "")
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


def cmd_analyze(args) -> int:
    from .activations import ActivationStore
    from .analyze import analyze
    from .build import LazyModel, evaluate_cached, load_run, read_log

    loaded, metrics, logs = [], {}, {}
    acts = None
    for run_arg in args.runs:
        run = Path(run_arg)
        if not (run / "final" / "cfg.json").exists():
            raise UserError(f"{run} is not a finished training run (no final/cfg.json).")
        sae, meta = load_run(run)
        if acts is None:
            if not (args.acts or meta.get("acts")):
                raise UserError(f"{run} does not record its activation folder; pass --acts DIR.")
            acts = ActivationStore(args.acts or meta.get("acts"))
            model = LazyModel(args.model or acts.model_name)
        name = run.name
        metrics[name] = evaluate_cached(run, sae, acts, model, args.eval_tokens, not args.quiet)
        logs[name] = read_log(run)
        loaded.append((name, sae, meta))
    analyze(loaded, acts, model.get(), Path(args.db), n_contexts=args.contexts, metrics=metrics,
            training_logs=logs, progress=not args.quiet)
    print(f"wrote {args.db} ({len(loaded)} SAE(s))")
    return 0


def cmd_build(args) -> int:
    from .build import BuildConfig, build

    cfg = BuildConfig.load(args.config)
    if args.db:
        cfg.db = args.db
    build(cfg, progress=not args.quiet)
    return 0


def cmd_serve(args) -> int:
    from explorer.launch import serve

    db = Path(args.db)
    if not db.exists():
        raise UserError(f"{db} does not exist; build one with `moesae build` or `moesae demo`.")
    from .store import open_db

    open_db(db).close()  # a wrong or old file fails here with one sentence
    return serve(db, host=args.host, port=args.port)


def cmd_demo(args) -> int:
    from .build import BuildConfig, build

    cfg = BuildConfig.load(args.config)
    db = build(cfg, progress=not args.quiet)
    if args.no_serve:
        return 0
    args.db = str(db)
    return cmd_serve(args)


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

    a = sub.add_parser("analyze", help="feature statistics, examples, map → a DuckDB file")
    a.add_argument("runs", nargs="+", help="training run folders (all go into one file)")
    a.add_argument("--db", required=True, help="DuckDB file to write (replaced atomically)")
    a.add_argument("--acts", help="activation folder (default: the first run's)")
    a.add_argument("--model", help="model (default: the one the activations came from)")
    a.add_argument("--contexts", type=int, default=400, help="analysis contexts (held-out)")
    a.add_argument("--eval-tokens", type=int, default=50_000, help="held-out tokens for metrics")
    a.set_defaults(func=cmd_analyze)

    b = sub.add_parser("build", help="the whole pipeline from a TOML config, every step cached")
    b.add_argument("--config", help="TOML file (default: the offline demo config)")
    b.add_argument("--db", help="override the config's DuckDB path")
    b.set_defaults(func=cmd_build)

    for name, help_ in (("serve", "open the explorer on a DuckDB file"),
                        ("demo", "build the default demo (cached) and open the explorer")):
        v = sub.add_parser(name, help=help_)
        if name == "serve":
            v.add_argument("--db", required=True, help="DuckDB file made by build/analyze")
        else:
            v.add_argument("--config", help="TOML file (default: the offline demo config)")
            v.add_argument("--no-serve", action="store_true", help="build only")
        v.add_argument("--host", default="127.0.0.1", help="address to listen on")
        v.add_argument("--port", type=int, default=8501, help="port")
        v.set_defaults(func=cmd_serve if name == "serve" else cmd_demo)

    from .steer import add_steer_args, cmd_steer

    st = sub.add_parser("steer", help="default vs steered continuation of a prompt")
    add_steer_args(st)
    st.set_defaults(func=cmd_steer)

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
