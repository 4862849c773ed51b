"""The paper's k-sweep (METHOD.md §5) at a scale that fits a 2-core CPU.

For each k ∈ {2, 8, 32}: the original Switch SAE, the authors' Switch stand-in (their Scale
code with e = 1: its router learns only from load balancing), Scale e=2 and e=8, each with and
without Feature Scaling for e = 2 and 8 — trained on the *same* activations (the default
model's middle layer), same width M, experts N, steps and batch, long enough for duplicates to
appear (~4M tokens; redundancy is logged at every checkpoint), and evaluated on the same
held-out tokens: MSE, FVU, redundancy@{0.7, 0.8, 0.9} overall / within / across experts, dead
fraction, CE loss recovered. Prints a table next to the paper's and the authors' numbers, writes
benchmarks/results/quality.json and a plot benchmarks/results/quality.png. Dense TopK is
available with --variants.

    python benchmarks/bench_quality.py [--tokens 500000] [--width 4608] [--experts 16]
        [--ks 2,8,32] [--steps 1000] [--batch 4096] [--data data/bench] [--cached-only]

Each finished cell's row is kept in its run folder, so an interrupted sweep resumes where it
stopped; --cached-only reports the finished cells without training the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    ("Switch", dict(arch="switch")),
    ("stand-in (Scale e=1)", dict(arch="scale", active=1)),
    ("Scale e=2", dict(arch="scale", active=2)),
    ("Scale e=8", dict(arch="scale", active=8)),
    ("Scale e=2 without FS", dict(arch="scale", active=2, feature_scaling=False)),
    ("Scale e=8 without FS", dict(arch="scale", active=8, feature_scaling=False)),
    ("TopK", dict(arch="topk")),
]
DEFAULT_VARIANTS = [name for name, _ in VARIANTS if name != "TopK"]

# METHOD.md §5 (GPT-2 small layer 8, M = 24,576, N = 64). The paper's "Switch" is the authors'
# stand-in (their Scale code with e = 1), so its redundancy row belongs to that variant.
PAPER_MSE = {
    "TopK": {2: 4262, 8: 3084, 32: 2241},
    "stand-in (Scale e=1)": {2: 4422, 8: 2908, 32: 2076},
    "Scale e=2": {2: 4019, 8: 2360, 32: 1304},
    "Scale e=8": {2: 4228, 8: 2668, 32: 1446},
}
PAPER_RED = {
    "stand-in (Scale e=1)": {2: 0.11991, 8: 0.04928, 32: 0.00769},
    "Scale e=2": {2: 0.00033, 8: 0.00346, 32: 0.00505},
    "Scale e=8": {2: 0.00024, 8: 0.00008, 32: 0.00073},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--ks", default="2,8,32")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=30_000)
    ap.add_argument("--data", default="data/bench")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--cached-only", action="store_true",
                    help="report the cells a previous (possibly interrupted) sweep finished; train nothing")
    args = ap.parse_args()

    data = Path(args.data)
    hcfg = set_flat(HarvestConfig(), dict(tokens=args.tokens, out=str(data / "acts")))
    t0 = time.perf_counter()
    acts = harvest(hcfg)
    harvest_s = time.perf_counter() - t0
    acts = ActivationStore(hcfg.out)
    model = load_model(acts.model_name)
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()} or set(DEFAULT_VARIANTS)

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
            # a finished run's row, reused when the same training and evaluation are asked for
            cached = Path(tc.out) / "bench_row.json"
            key = json.dumps([dataclasses.asdict(tc), args.eval_tokens], sort_keys=True, default=str)
            old = json.loads(cached.read_text()) if cached.exists() else None
            if old is not None and old.get("key") == key:
                rows.append(old)
            elif args.cached_only:
                print(f"not measured yet: {name}, k = {k}", flush=True)
                continue
            else:
                t = time.perf_counter()
                run = train(tc)
                train_s = time.perf_counter() - t
                sae, _ = load_sae(run / "final")
                m = evaluate(sae, acts, model, EvalConfig(eval_tokens=args.eval_tokens))
                log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
                rows.append({
                    "model": name, "k": k, "mse": m["mse"], "fvu": m["fvu"],
                    **{key: v for key, v in m.items() if key.startswith(("redundancy_", "mean_max_cos"))},
                    "ce_loss_recovered": m["ce_loss_recovered"], "dead_fraction": m["dead_fraction"],
                    "expert_load_entropy": m.get("expert_load_entropy"),
                    "train_seconds": train_s,
                    "final_log": next((r for r in reversed(log) if r.get("kind") == "train"), None),
                    "curve": [{"step": r["step"], "fvu": r["fvu"]} for r in log if r.get("kind") == "train"],
                    "redundancy_curve": [{"step": r["step"], "redundancy_ratio_0.9": r["redundancy_ratio_0.9"],
                                          "mean_max_cos": r["mean_max_cos"]}
                                         for r in log if r.get("kind") == "redundancy"],
                })
                cached.write_text(json.dumps({**rows[-1], "key": key}))
            print(json.dumps({kk: rows[-1][kk] for kk in ("model", "k", "mse", "fvu",
                  "redundancy_ratio_0.9", "ce_loss_recovered")}), flush=True)
            write(rows, args, acts, harvest_s)  # after every run: an interrupted sweep keeps its rows

    print(f"\nMoE-SAE comparison on {acts.model_name} {acts.hook}: M={args.width}, N={args.experts}, "
          f"{args.steps} steps × {args.batch} tokens ({args.steps * args.batch:,} tokens) on "
          f"{acts.split('train').n_tokens:,} harvested training tokens")
    hdr = (f"{'model':<22}{'k':>4}{'MSE':>9}{'FVU':>7}{'red@.7':>8}{'red@.8':>8}{'red@.9':>8}"
           f"{'w/in@.9':>8}{'acr@.9':>8}{'CE rec':>8}{'dead':>7}  paper MSE, red@.9")
    print(hdr)
    for r in rows:
        pm = PAPER_MSE.get(r["model"], {}).get(r["k"], "")
        pr = PAPER_RED.get(r["model"], {}).get(r["k"], "")
        ce = r["ce_loss_recovered"]
        across = r.get("redundancy_across_0.9")
        print(f"{r['model']:<22}{r['k']:>4}{r['mse']:>9.1f}{r['fvu']:>7.3f}"
              f"{r['redundancy_ratio_0.7']:>8.4f}{r['redundancy_ratio_0.8']:>8.4f}{r['redundancy_ratio_0.9']:>8.4f}"
              f"{r['redundancy_within_0.9']:>8.4f}{(across if across is not None else float('nan')):>8.4f}"
              f"{(ce if ce is not None else float('nan')):>8.3f}{r['dead_fraction']:>7.3f}  {pm!s} {pr!s}")
    write(rows, args, acts, harvest_s)


def write(rows, args, acts, harvest_s: float) -> None:
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
    print(f"wrote {out}", flush=True)


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    all_ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in models:
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["k"])
        ks = [r["k"] for r in mine]
        colour = f"C{models.index(name)}"  # one colour per model in every panel
        axes[0].plot(ks, [r["mse"] for r in mine], marker="o", label=name, color=colour)
        axes[1].plot(ks, [r["redundancy_ratio_0.9"] for r in mine], marker="o", label=name, color=colour)
        for r in mine:  # redundancy is tracked at every checkpoint: duplicates appear late
            curve = r.get("redundancy_curve") or []
            if curve:
                axes[2].plot([c["step"] for c in curve], [c["redundancy_ratio_0.9"] for c in curve],
                             label=f"{name} k={r['k']}", color=colour,
                             linestyle="-" if r["k"] == min(all_ks) else "--")
    axes[0].set(title="held-out MSE (model units)", xlabel="k", xscale="log")
    axes[1].set(title="redundancy@0.9 (held-out evaluation)", xlabel="k", xscale="log")
    axes[2].set(title="redundancy@0.9 during training", xlabel="step")
    for ax in axes[:2]:
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.minorticks_off()
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
