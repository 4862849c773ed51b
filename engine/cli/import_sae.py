"""`moesae import`: a foreign SAE checkpoint (SAELens; the reference codes' dictionary_learning
layout) → our format."""

from __future__ import annotations

from pathlib import Path

HELP = "import an SAE: SAELens, or the Scale / Switch reference codes' dictionary_learning folders"


def add(sub) -> None:
    p = sub.add_parser("import", help=HELP)
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats import import_sae, save_sae

    sae, meta, fmt = import_sae(args.src)
    save_sae(sae, Path(args.out), meta)
    print(f"imported {args.src} ({fmt}: {sae.cfg.width} features, d_in {sae.cfg.d_in}) → {args.out}")
    return 0
