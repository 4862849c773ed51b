"""`moesae eval`: METHOD.md §4 metrics of one SAE on held-out tokens."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..metrics.evaluate import EvalConfig
from .args import add_options, config_from_args

HELP = "METHOD.md §4 metrics on held-out tokens"


def add(sub) -> None:
    p = sub.add_parser("eval", help=HELP)
    p.add_argument("run", help="run folder (or checkpoint folder)")
    p.add_argument("--acts", help="activation folder (default: the one it was trained on)")
    p.add_argument("--model", help="model for CE/KL (default: the one it was trained on)")
    add_options(p, EvalConfig)
    p.add_argument("--no-ce", action="store_true", help="skip CE loss recovered / KL (no model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.activation_store import ActivationStore
    from ..formats import load_sae
    from ..metrics.evaluate import evaluate, format_table
    from ..models import load_model
    from ..training.run_folder import RunFolder

    sae, meta = load_sae(RunFolder.checkpoint_of(args.run))
    acts_dir = args.acts or meta.get("acts")
    if not acts_dir:
        raise UserError("This SAE does not record its activation folder; pass --acts DIR.")
    acts = ActivationStore(acts_dir)
    model = None
    if not args.no_ce:
        model = load_model(args.model or meta.get("model") or acts.model_name)
        model.check_sae(sae)
    metrics = evaluate(sae, acts, model, config_from_args(EvalConfig, args),
                       progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table({Path(args.run).name: metrics}))
    return 0
