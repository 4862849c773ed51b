"""Training throughput: tokens/s of one full training step (forward, backward, Adam, decoder
renormalisation) for dense TopK, Switch and Scale e=1,2,4 at the same width, on the same
activation batches, in one run; reported as ratios to dense TopK. The same dense TopK is also
trained with the sae-lens package's TopK training SAE (its `training_forward_pass` + the
steps of `SAETrainer._train_step`) on the same batches, for comparison.

    python benchmarks/bench_train.py [--acts DIR] [--width 4608] [--experts 16] [--k 32]
                                     [--batch 4096] [--steps 12] [--repeats 5]

Without --acts it uses Gaussian activations of the default model's width (d = 576): the step
cost does not depend on the data. Prints a table and writes benchmarks/results/train.json.
With --torch-kernels-too, dense TopK and Scale e=2 also run with the numba CPU kernels off
(engine/sae/cpu_kernels.py; "…, torch" rows, their ratio taken to dense TopK with the same
kernels). Then, for each of our variants, where a step's time goes: the median of each phase (encode,
decode, loss, backward, the optimiser's part) over `--phase-steps` steps, the variants taking
turns step by step; in the JSON and as a stacked bar plot beside it (train_phases.png).
As the `moesae` command, it keeps freed memory (unless --system-malloc) and sets OpenMP's
spinning before torch loads (engine/openmp.py; the JSON records GOMP_SPINCOUNT).
"""

from __future__ import annotations  # noqa: I001 - the block puts engine.openmp first, on purpose

import engine.openmp  # noqa: F401 - sets OpenMP's spinning as `moesae` has it, before torch loads
import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from engine.runtime import allocator_label, keep_freed_memory
from engine.sae import SAEConfig, build_sae, cpu_kernels
from engine.sae.base import squared_error
from engine.training.schedule import lr_for_width, make_adam, optimiser_step


def batches(args, d):
    if args.acts:
        from engine.data.activation_store import ActivationStore

        store = ActivationStore(args.acts)
        data = store.split("train")
        rng = np.random.default_rng(0)
        out = []
        for _ in range(args.steps):
            idx = np.sort(rng.choice(data.n_tokens, args.batch, replace=False))
            out.append(torch.from_numpy(np.asarray(data.read(idx), np.float32)) * store.norm_scale)
        return out, store.d_in
    g = torch.Generator().manual_seed(0)
    return [torch.randn(args.batch, d, generator=g) for _ in range(args.steps)], d


PHASES = ("encode", "decode", "loss", "backward", "optimiser")
"""A step's phases as `ours_step_fn` marks them; `optimiser` is the decoder-gradient projection,
clipping, Adam and the decoder's renormalisation."""


def ours_step_fn(cfg: SAEConfig, lr: float):
    """One training step as a function of the batch; `mark(phase)`, when given, is called as
    each phase of PHASES ends (`sae(x)` without a dead mask and the loss, spelled out: encode,
    decode, MSE, the logged FVU and the load-balancing loss)."""
    torch.manual_seed(0)
    sae = build_sae(cfg)
    opt = make_adam(sae.parameters(), lr)
    lb_weight = 0.01 * cfg.d_in

    def step(x, mark=lambda phase: None):
        codes = sae.encode(x)
        mark("encode")
        x_hat = sae.decode(codes.top_acts, codes.top_indices)
        mark("decode")
        sse, spread = squared_error(x_hat, x)
        _fvu = sse.detach() / spread  # forward() logs it
        loss = sse / x.shape[0] + lb_weight * sae.load_balance_loss(codes)
        mark("loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        optimiser_step(sae, opt, 1.0)
        mark("optimiser")

    return step


def with_torch_kernels(step):
    """The step with the numba kernels off (`cpu_kernels.use` says no): PyTorch's forms, for
    an A/B in the same run."""
    def run(x, mark=lambda phase: None):
        was, cpu_kernels.ENABLED = cpu_kernels.ENABLED, False
        try:
            step(x, mark)
        finally:
            cpu_kernels.ENABLED = was

    return run


def phase_times(steps: dict, xs, n_steps: int) -> dict[str, dict[str, float]]:
    """For each step function, the median milliseconds of each phase over n_steps steps; the
    variants take turns step by step, so that a slow stretch of the machine hits all alike."""
    times = {name: {p: [] for p in PHASES} for name in steps}
    last = [0.0]  # when the previous phase ended

    for i in range(n_steps):
        for name, step in steps.items():
            def mark(phase, into=times[name]):
                now = time.perf_counter()
                into[phase].append((now - last[0]) * 1000)
                last[0] = now

            last[0] = time.perf_counter()
            step(xs[i % len(xs)], mark)
    return {name: {p: statistics.median(t) for p, t in ph.items()} for name, ph in times.items()}


def plot_phases(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "phases_ms" in r]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    left = [0.0] * len(rows)
    for phase in PHASES:
        widths = [r["phases_ms"][phase] for r in rows]
        ax.barh([r["model"] for r in rows], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median of each phase)")
    ax.legend(ncol=len(PHASES), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def saelens_step_fn(d: int, width: int, k: int, lr: float):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    dead = torch.zeros(width, dtype=torch.bool)
    n_steps = [0]

    def step(x):
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                           n_training_steps=n_steps[0], is_logging_step=False)
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps[0] += 1

    return step


def measure(step, xs, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in xs:
            step(x)
        rates.append(sum(x.shape[0] for x in xs) / (time.perf_counter() - t))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts")
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--phase-steps", type=int, default=20,
                    help="steps timed phase by phase for each variant (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--torch-kernels-too", action="store_true",
                    help="also dense TopK and Scale e=2 with the numba CPU kernels off (an A/B)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's allocator as it is (the moesae command keeps freed memory)")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    args = ap.parse_args()
    kept = not args.system_malloc and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    xs, d = batches(args, args.d)
    lr = lr_for_width(args.width)
    variants = [
        ("topk", dict(arch="topk")),
        ("switch", dict(arch="switch")),
        ("scale e=1", dict(arch="scale", active=1)),
        ("scale e=2", dict(arch="scale", active=2)),
        ("scale e=4", dict(arch="scale", active=4)),
    ]
    rows = []
    # interleave the variants across repeats so that machine noise hits all of them alike
    steps = {name: ours_step_fn(SAEConfig(d_in=d, width=args.width, experts=args.experts,
                                          k=args.k, **kw), lr) for name, kw in variants}
    if args.torch_kernels_too:
        for name, kw in variants:
            if name in ("topk", "scale e=2"):
                cfg = SAEConfig(d_in=d, width=args.width, experts=args.experts, k=args.k, **kw)
                steps[f"{name}, torch"] = with_torch_kernels(ours_step_fn(cfg, lr))
        variants += [(f"{n}, torch", {}) for n in ("topk", "scale e=2")]
    try:
        steps["sae-lens topk"] = saelens_step_fn(d, args.width, args.k, lr)
    except Exception as exc:  # reported, not hidden
        print(f"sae-lens comparison unavailable: {exc}")
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():  # warm-up
        fn(xs[0])
    for _ in range(args.repeats):
        for name, fn in steps.items():
            rates[name] += measure(fn, xs, 1)
    base = statistics.median(rates["topk"])
    for name, r in rates.items():
        med = statistics.median(r)
        rows.append({"model": name, "tokens_per_s_median": med, "tokens_per_s_all": r,
                     "ratio_to_topk": med / base})
        if name.endswith(", torch"):  # its ratio to dense TopK with the same kernels
            rows[-1]["ratio_to_topk"] = med / statistics.median(rates["topk, torch"])
    if args.phase_steps:
        ours = {name: steps[name] for name, _ in variants if name in steps}
        phases = phase_times(ours, xs, args.phase_steps)
        for row in rows:
            if row["model"] in phases:
                row["phases_ms"] = phases[row["model"]]

    print(f"\nTraining throughput, d={d}, M={args.width}, N={args.experts}, k={args.k}, "
          f"batch={args.batch}, {args.steps} steps × {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':<18}{'tokens/s (median)':>20}{'× dense TopK':>16}")
    for r in rows:
        print(f"{r['model']:<18}{r['tokens_per_s_median']:>20,.0f}{r['ratio_to_topk']:>16.2f}")
    if args.phase_steps:
        print(f"\nms per step, median of {args.phase_steps} steps phase by phase")
        print(f"{'model':<18}" + "".join(f"{p:>11}" for p in PHASES) + f"{'sum':>9}")
        for r in rows:
            if "phases_ms" in r:
                ph = r["phases_ms"]
                print(f"{r['model']:<18}" + "".join(f"{ph[p]:>11.1f}" for p in PHASES)
                      + f"{sum(ph.values()):>9.1f}")
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "allocator": allocator_label(kept),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "config": vars(args) | {"d": d},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.phase_steps:
        plot = out.with_name(out.stem + "_phases.png")
        plot_phases(rows, plot)
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
