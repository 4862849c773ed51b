"""`moesae analyze`: one-pass feature statistics and examples of finished runs → a DuckDB file."""

from __future__ import annotations

from pathlib import Path

from ..analysis.config import AnalysisConfig
from ..errors import UserError
from ..metrics.evaluate import EvalConfig
from .args import add_options, config_from_args

HELP = "feature statistics, examples, map → a DuckDB file"


def add(sub) -> None:
    p = sub.add_parser("analyze", help=HELP)
    p.add_argument("runs", nargs="+", help="training run folders (all go into one file)")
    p.add_argument("--db", required=True, help="DuckDB file to write (replaced atomically)")
    p.add_argument("--acts", help="activation folder (default: the first run's)")
    p.add_argument("--model", help="model (default: the one the activations came from)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="the name pages show for each run, in order (repeat once per run; "
                        "default: the run folder's name)")
    add_options(p, AnalysisConfig)
    add_options(p, EvalConfig, skip=("runtime",))  # --device/--precision: one pair for both
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.pipeline import analyze
    from ..build import evaluate_cached, load_run
    from ..data.activation_store import ActivationStore
    from ..models import LazyModel
    from ..training.run_folder import RunFolder

    eval_cfg = config_from_args(EvalConfig, args)
    names = args.name or [RunFolder(r).name for r in args.runs]
    if len(names) != len(args.runs):
        raise UserError(f"Give one --name per run: {len(args.runs)} run(s), {len(names)} name(s).")
    if len(set(names)) != len(names):
        raise UserError("Every SAE of a build needs a different name; pass --name once per run.")
    loaded, runs, logs = [], [], {}
    acts = model = None
    for run_arg, name in zip(args.runs, names, strict=True):
        run = RunFolder(run_arg)
        if not run.is_finished():
            raise UserError(f"{run.path} is not a finished training run (no final/cfg.json).")
        sae, meta = load_run(run)
        if acts is None:
            if not (args.acts or meta.get("acts")):
                raise UserError(f"{run.path} does not record its activation folder; pass --acts DIR.")
            acts = ActivationStore(args.acts or meta.get("acts"))
            model = LazyModel(args.model or acts.model_name)
        logs[name] = run.read_log()
        loaded.append((name, sae, meta))
        runs.append(run)
    metrics = evaluate_cached(names, runs, [sae for _, sae, _ in loaded], acts, model, eval_cfg,
                              not args.quiet)
    analyze(loaded, acts, model.get(), Path(args.db), config_from_args(AnalysisConfig, args),
            metrics=metrics, training_logs=logs, progress=not args.quiet)
    print(f"wrote {args.db} ({len(loaded)} SAE(s))")
    return 0
