"""Steered generation's overhead against plain generation on the same prompt.

    python benchmarks/bench_steer.py [--model smollm2-135m] [--tokens 32] [--repeats 3]

Times `LoadedModel.generate` without a hook and with each steering intervention as
`engine.steering.run.steer` runs it (hook registered once around the loop; greedy, same
prompt, same number of new tokens; generation stops only at --tokens), interleaved so drift in
machine load hits every variant alike, and reports the ratio steered / plain of the fastest
run of each (the least disturbed by other processes on a shared machine; medians are shown too). Target:
≤ 1.2× for additive steering. The SAE is a random Scale SAE of the demo's shape (M = 4608,
N = 16, e = 2, k = 32) at the model's default hook; speed does not depend on its weights.
`--compare-forward` also times every variant through TransformerLens's bridge instead of the
model's own forward pass (rows marked [bridge]; their ratios too are to the default's plain run).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime

import torch

from engine.models import DEFAULT_MODEL, load_model
from engine.sae import SAEConfig, build_sae
from engine.steering.intervention import Intervention
from engine.steering.run import generate_steered
from engine.steering.spec import SteerSpec

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--compare-forward", action="store_true",
                    help="also time every variant through TransformerLens's bridge "
                         "(--model-forward bridge), interleaved with the default")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    hook = lm.default_hook
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="scale", d_in=lm.d_model, width=args.width,
                              experts=args.experts, active=2, k=32)).eval()
    tokens = lm.to_tokens(PROMPT)
    acts = lm.activations(tokens, hook)[0, 1:]
    sae.input_scale.fill_(float((lm.d_model / acts.pow(2).sum(-1).mean()).sqrt()))
    P = tokens.shape[1]

    variants: dict[str, SteerSpec | None] = {
        "plain": None,
        "add (all positions)": SteerSpec(features=[(7, 8.0), (99, -4.0)]),
        "add (generated only)": SteerSpec(features=[(7, 8.0), (99, -4.0)], positions="generated"),
        "clamp": SteerSpec(features=[(7, 8.0)], mode="clamp"),
        "ablate expert": SteerSpec(ablate_expert=0),
        "force expert": SteerSpec(force_expert=0),
    }

    forwards = ["auto", "bridge"] if args.compare_forward else ["auto"]

    def run(spec: SteerSpec | None, forward: str = "auto") -> float:
        lm.forward = forward
        t = time.perf_counter()
        if spec is None:
            out = lm.generate(tokens, args.tokens, stop_at_eos=False)
        else:
            fn = Intervention(sae, spec, P)
            out = generate_steered(lm, tokens, hook, fn,
                                   dict(max_new_tokens=args.tokens, stop_at_eos=False))
        assert len(out) == args.tokens
        return time.perf_counter() - t

    for forward in forwards:  # warm-up
        for spec in variants.values():
            run(spec, forward)
    label = {(f, name): name if f == "auto" else f"{name} [bridge]"
             for f in forwards for name in variants}
    times: dict[str, list[float]] = {v: [] for v in label.values()}
    for _ in range(args.repeats):
        for forward in forwards:
            for name, spec in variants.items():
                times[label[forward, name]].append(run(spec, forward))

    plain = min(times["plain"])
    rows = []
    print(f"{args.model}, hook {hook}, prompt {P} tokens + {args.tokens} new, "
          f"best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'variant':<31} {'best s':>8} {'median s':>9} {'tokens/s':>9} {'ratio':>6}")
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        rows.append({"variant": name, "seconds": best, "median_seconds": med,
                     "tokens_per_s": args.tokens / best, "ratio": best / plain})
        print(f"{name:<31} {best:8.3f} {med:9.3f} {args.tokens / best:9.1f} {best / plain:6.2f}")
    add_ratio = next(r["ratio"] for r in rows if r["variant"] == "add (all positions)")
    print(f"additive steering overhead: {add_ratio:.2f}× (target ≤ 1.2×: "
          f"{'met' if add_ratio <= 1.2 else 'NOT met'})")
    print(json.dumps({
        "benchmark": "steer_overhead", "model": args.model, "hook": hook, "prompt_tokens": P,
        "new_tokens": args.tokens, "repeats": args.repeats, "sae_width": args.width,
        "sae_experts": args.experts, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows, "add_ratio": add_ratio, "target": 1.2, "met": add_ratio <= 1.2,
    }))


if __name__ == "__main__":
    main()
