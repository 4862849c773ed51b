"""The paper's comparison (METHOD.md §5) at a scale that fits a 2-core CPU.

Dense TopK, Switch, Scale e=2, Scale e=4 and Scale e=2 without Feature Scaling, trained on
the *same* activations (the default model's middle layer), same width M, experts N and k,
same steps and batch; evaluated on the same held-out tokens: MSE, FVU, redundancy@0.9,
CE loss recovered. Prints a table next to the paper's numbers, writes
benchmarks/results/quality.json and a plot benchmarks/results/quality.png.

    python benchmarks/bench_quality.py [--tokens 300000] [--width 4608] [--experts 16]
        [--ks 8,32] [--steps 600] [--batch 4096] [--data data/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from engine.data.activation_store import ActivationStore
from engine.data.harvest import HarvestConfig, harvest
from engine.formats import load_sae
from engine.metrics.evaluate import EvalConfig, evaluate
from engine.models import load_model
from engine.options import set_flat
from engine.training.config import TrainConfig
from engine.training.trainer import train

VARIANTS = [
    ("TopK", dict(arch="topk")),
    ("Switch", dict(arch="switch")),
    ("Scale e=2", dict(arch="scale", active=2)),
    ("Scale e=4", dict(arch="scale", active=4)),
    ("Scale e=2, no FS", dict(arch="scale", active=2, feature_scaling=False)),
]

# METHOD.md §5 (GPT-2 small layer 8, M = 24,576, N = 64): MSE and redundancy@0.9.
PAPER_MSE = {
    "TopK": {2: 4262, 8: 3084, 32: 2241, 128: 1437},
    "Switch": {2: 4422, 8: 2908, 32: 2076, 128: 1447},
    "Scale e=2": {2: 4019, 8: 2360, 32: 1304, 128: 826},
}
PAPER_RED = {"Switch": {2: 0.120, 8: 0.049, 32: 0.0077}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=30_000)
    ap.add_argument("--data", default="data/bench")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    args = ap.parse_args()

    data = Path(args.data)
    hcfg = set_flat(HarvestConfig(), dict(tokens=args.tokens, out=str(data / "acts")))
    t0 = time.perf_counter()
    acts = harvest(hcfg)
    harvest_s = time.perf_counter() - t0
    acts = ActivationStore(hcfg.out)
    model = load_model(acts.model_name)
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}

    rows = []
    for k in [int(v) for v in args.ks.split(",")]:
        for name, kw in VARIANTS:
            if wanted and name not in wanted:
                continue
            tc = set_flat(TrainConfig(), dict(
                acts=hcfg.out, width=args.width, experts=args.experts, k=k, steps=args.steps,
                batch_tokens=args.batch, checkpoint_every=max(args.steps // 20, 25),
                out=str(data / "runs" / f"{name.replace(' ', '_').replace(',', '').replace('=', '')}-k{k}"),
                **kw))
            t = time.perf_counter()
            run = train(tc)
            train_s = time.perf_counter() - t
            sae, _ = load_sae(run / "final")
            m = evaluate(sae, acts, model, EvalConfig(eval_tokens=args.eval_tokens))
            log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
            rows.append({
                "model": name, "k": k, "mse": m["mse"], "fvu": m["fvu"],
                "redundancy_ratio_0.9": m["redundancy_ratio_0.9"],
                "redundancy_ratio_0.8": m["redundancy_ratio_0.8"],
                "mean_max_cos": m["mean_max_cos"],
                "ce_loss_recovered": m["ce_loss_recovered"], "dead_fraction": m["dead_fraction"],
                "expert_load_entropy": m.get("expert_load_entropy"),
                "train_seconds": train_s,
                "final_log": next((r for r in reversed(log) if r.get("kind") == "train"), None),
                "curve": [{"step": r["step"], "fvu": r["fvu"]} for r in log if r.get("kind") == "train"],
                "redundancy_curve": [{"step": r["step"], "redundancy_ratio_0.9": r["redundancy_ratio_0.9"],
                                      "mean_max_cos": r["mean_max_cos"]}
                                     for r in log if r.get("kind") == "redundancy"],
            })
            print(json.dumps({kk: rows[-1][kk] for kk in ("model", "k", "mse", "fvu",
                  "redundancy_ratio_0.9", "ce_loss_recovered")}), flush=True)

    print(f"\nMoE-SAE comparison on {acts.model_name} {acts.hook}: M={args.width}, N={args.experts}, "
          f"{args.steps} steps × {args.batch} tokens ({args.steps * args.batch:,} tokens) on "
          f"{acts.split('train').n_tokens:,} harvested training tokens")
    hdr = f"{'model':<18}{'k':>4}{'MSE':>10}{'FVU':>8}{'red@0.9':>9}{'CE rec':>8}{'dead':>7}   paper MSE  paper red@0.9"
    print(hdr)
    for r in rows:
        pm = PAPER_MSE.get(r["model"], {}).get(r["k"], "")
        pr = PAPER_RED.get(r["model"], {}).get(r["k"], "")
        ce = r["ce_loss_recovered"]
        print(f"{r['model']:<18}{r['k']:>4}{r['mse']:>10.2f}{r['fvu']:>8.3f}"
              f"{r['redundancy_ratio_0.9']:>9.4f}{(ce if ce is not None else float('nan')):>8.3f}"
              f"{r['dead_fraction']:>7.3f}   {pm!s:>9}  {pr!s:>12}")
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": acts.model_name, "hook": acts.hook, "harvest_seconds": harvest_s,
        "config": vars(args), "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(5 * (len(ks) + 1), 4))
    for ax, k in zip(axes, ks, strict=False):
        for r in rows:
            if r["k"] == k and r["curve"]:
                ax.plot([c["step"] for c in r["curve"]], [c["fvu"] for c in r["curve"]], label=r["model"])
        ax.set_title(f"training FVU, k={k}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for r in rows:  # redundancy is tracked at every checkpoint: duplicates appear late
        curve = r.get("redundancy_curve") or []
        if curve:
            ax.plot([c["step"] for c in curve], [c["mean_max_cos"] for c in curve],
                     label=f"{r['model']} k={r['k']}")
    ax.set_title("mean max decoder cosine during training")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
