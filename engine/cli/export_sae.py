"""`moesae export`: a dense TopK SAE → SAELens format."""

from __future__ import annotations

from pathlib import Path

HELP = "export a dense TopK SAE to SAELens format"


def add(sub) -> None:
    p = sub.add_parser("export", help=HELP)
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats import load_sae
    from ..formats.saelens import export_saelens
    from ..training.run_folder import RunFolder

    sae, meta = load_sae(RunFolder.checkpoint_of(args.run))
    export_saelens(sae, Path(args.out), meta)
    print(f"exported to SAELens format: {args.out}")
    return 0
