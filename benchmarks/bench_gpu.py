"""The engine at speed, on whatever device there is (a GPU when present; the CPU otherwise, with
smaller defaults): three measurements, one JSON file and one plot.

1. Step time of one full training step (forward, backward, Adam, decoder renormalisation)
   for dense TopK, Switch, Scale e=2 and e=8, in every precision the device has, with the
   fast kernels and the plain reference (engine/sae/moe.py) — median over repeats.
2. `moesae train` end to end on a synthetic harvest (random activations cost the same as
   real ones): tokens/s from its own log against the step-only rate, and the final FVU in
   each precision against fp32 (the rule for the default precision: the fastest whose final
   FVU stays within 1 % of fp32's).
3. Harvest tokens/s of the offline default model at its default hook (skipped when the model
   is not installed).

    python benchmarks/bench_gpu.py                 # GPU: the paper's size; CPU: the demo's
    python benchmarks/bench_gpu.py --size paper    # d=576, M=24,576, N=64, k=32, batch 8,192
    python benchmarks/bench_gpu.py --parts step    # only the step times

Writes benchmarks/results/gpu-<device>.json and .png.
"""

from __future__ import annotations  # noqa: I001 - the block puts engine.openmp first, on purpose

import engine.openmp  # noqa: F401 - sets OpenMP's spinning as `moesae` has it, before torch loads
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic import synthetic_harvest  # noqa: E402
from engine.options import set_flat  # noqa: E402
from engine.runtime import (  # noqa: E402
    RuntimeConfig,
    allocator_label,
    available_precisions,
    default_precision,
    keep_freed_memory,
    resolve,
)
from engine.sae import SAEConfig, build_sae  # noqa: E402
from engine.training.config import TrainConfig  # noqa: E402
from engine.training.schedule import lr_for_width, make_adam, optimiser_step  # noqa: E402
from engine.training.trainer import StepRecorder, train  # noqa: E402

SIZES = {
    "paper": dict(d=576, width=24576, experts=64, k=32, batch=8192),
    "cpu": dict(d=576, width=4608, experts=16, k=32, batch=4096),
}
ARCHS = [("topk", dict(arch="topk")), ("switch", dict(arch="switch")),
         ("scale e=2", dict(arch="scale", active=2)), ("scale e=8", dict(arch="scale", active=8))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_ms(fn, xs, device: torch.device, repeats: int) -> float:
    """Median over `repeats` of the mean time of fn(x) over xs, the device synchronised around."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for x in xs:
            fn(x)
        sync(device)
        times.append((time.perf_counter() - t) / len(xs))
    return statistics.median(times) * 1000


def step_fn(cfg: SAEConfig, device: torch.device, precision: str, kernels: str, graph: bool = False):
    """The trainer's step before any feature is dead (AuxK off) as a function of the batch;
    with `graph`, recorded once as a CUDA graph by the trainer's `StepRecorder` (capturable
    fused Adam with its lr on the device, autocast without its cast cache, three warm-up steps
    on a side stream) and replayed with each batch copied into the recorded input."""
    torch.manual_seed(0)
    sae = build_sae(cfg).to(device)
    sae.kernels = kernels
    rt = resolve(RuntimeConfig(device=str(device), precision=precision))
    lr = lr_for_width(cfg.width)
    opt = make_adam(sae.parameters(), torch.tensor(lr, device=device) if graph else lr, capturable=graph)

    def step(x):
        with rt.autocast(cache=not graph):
            out = sae(x)
        loss = out.mse + 0.01 * cfg.d_in * out.lb_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        optimiser_step(sae, opt, 1.0)

    if not graph:
        return step
    recorder = StepRecorder(device)  # the trainer's own
    recorded: dict = {}

    def graphed(x):
        if "replay" not in recorded:
            for _ in range(3):
                recorder.eager(lambda: step(x))
            recorded["x"] = x.clone()
            recorded["replay"] = recorder.record(lambda: step(recorded["x"]))
        recorded["x"].copy_(x)
        recorded["replay"]()

    return graphed


def bench_steps(size: dict, device: torch.device, precisions, steps: int, repeats: int,
                rows: list, save=lambda: None) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(size["batch"], size["d"], device=device, generator=g) for _ in range(steps)]
    for name, kw in ARCHS:
        for precision in precisions:
            for kernels in ("fast", "fast, graph", "reference") if device.type == "cuda" else ("fast", "reference"):
                if device.type == "cpu" and precision == "bf16" and kernels == "reference":
                    # the dense bf16 backward takes seconds per step on a CPU without bf16 units
                    rows.append({"model": name, "precision": precision, "kernels": kernels,
                                 "error": "not measured: the dense bf16 backward takes ~5 s a step on this CPU"})
                    print(_row(rows[-1]), flush=True)
                    continue
                cfg = SAEConfig(d_in=size["d"], width=size["width"], experts=size["experts"],
                                k=size["k"], **kw)
                if "graph" in kernels and _waits(cfg, device, precision):
                    rows.append({"model": name, "precision": precision, "kernels": kernels,
                                 "error": "not recordable: the experts' matmuls are a host-synchronised loop in this precision"})
                    print(_row(rows[-1]), flush=True)
                    continue
                try:
                    fn = step_fn(cfg, device, precision, kernels.split(",")[0], graph="graph" in kernels)
                    fn(xs[0])
                    fn(xs[1 % steps])  # warm-up (allocations, kernel selection)
                    ms = median_step_ms(fn, xs, device, repeats)
                    rows.append({"model": name, "precision": precision, "kernels": kernels,
                                 "step_ms": ms, "tokens_per_s": size["batch"] / ms * 1000})
                except Exception as exc:  # e.g. out of memory: reported, not hidden
                    traceback.print_exc()
                    rows.append({"model": name, "precision": precision, "kernels": kernels,
                                 "error": _error(exc)})
                print(_row(rows[-1]), flush=True)
                save()
                fn = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _waits(cfg: SAEConfig, device: torch.device, precision: str) -> bool:
    """Whether this step reads the device on the host (so it cannot be one CUDA graph)."""
    rt = resolve(RuntimeConfig(device=str(device), precision=precision))
    return build_sae(cfg).step_waits_for_device(device, rt.compute_dtype)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:<11}{r['precision']:>6}{r['kernels']:>13}   {r['error']}"
    return (f"{r['model']:<11}{r['precision']:>6}{r['kernels']:>13}{r['step_ms']:>10.2f} ms"
            f"{r['tokens_per_s']:>14,.0f} tok/s")


def bench_trainer(size: dict, device: torch.device, precisions, tokens: int, steps: int,
                  step_rows: list[dict], rows: list, save=lambda: None) -> list[dict]:
    # the default precision first: a run cut short has measured what matters most
    precisions = sorted(precisions, key=lambda p: p != default_precision(device))
    with tempfile.TemporaryDirectory(prefix="moesae-bench-") as tmp:
        acts = synthetic_harvest(Path(tmp) / "acts", tokens, size["d"])
        # on CUDA the trainer records its step as a graph (auto); the default precision once
        # more without, to show what the graph is worth end to end
        runs = [(p, "auto") for p in precisions]
        if device.type == "cuda":
            runs.insert(1, (precisions[0], "off"))
        for precision, graph in runs:
            cfg = set_flat(TrainConfig(), dict(
                acts=str(acts.path), out=str(Path(tmp) / f"run-{precision}-{graph}"), arch="scale",
                active=2, width=size["width"], experts=size["experts"], k=size["k"],
                batch_tokens=size["batch"], steps=steps, log_every=max(1, steps // 10),
                checkpoint_every=steps, device=str(device), precision=precision, cuda_graph=graph,
            ))
            t = time.perf_counter()
            try:
                run = train(cfg, progress=False)
            except Exception as exc:  # reported, not hidden; the other precisions still run
                traceback.print_exc()
                rows.append({"precision": precision, "cuda_graph": graph, "error": _error(exc)})
                print(rows[-1], flush=True)
                save()
                continue
            wall = time.perf_counter() - t
            log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
            train_rows = [r for r in log if r["kind"] == "train"]
            logged = statistics.median(r["tokens_per_s"] for r in train_rows[1:] or train_rows)
            scale = SAEConfig(d_in=size["d"], width=size["width"], experts=size["experts"],
                              k=size["k"], arch="scale", active=2)
            graphed = device.type == "cuda" and graph == "auto" and not _waits(scale, device, precision)
            kernels = "fast, graph" if graphed else "fast"
            step_only = next((r["tokens_per_s"] for r in step_rows if r.get("model") == "scale e=2"
                              and r["precision"] == precision and r["kernels"] == kernels
                              and "tokens_per_s" in r), None)
            rows.append({
                "precision": precision, "cuda_graph": graph, "steps": steps, "tokens": tokens,
                "tokens_per_s_logged": logged, "tokens_per_s_wall": steps * size["batch"] / wall,
                "step_only_kernels": kernels, "step_only_tokens_per_s": step_only,
                "ratio_to_step_only": logged / step_only if step_only else None,
                "final_fvu": train_rows[-1]["fvu"], "wall_seconds": wall,
            })
            print(rows[-1], flush=True)
            save()
    fp32 = next((r["final_fvu"] for r in rows if r["precision"] == "fp32" and r["cuda_graph"] == "auto"
                 and "final_fvu" in r), None)
    for r in rows:
        if "final_fvu" in r:
            r["fvu_vs_fp32"] = (r["final_fvu"] - fp32) / fp32 if fp32 else None
    return rows


def _gpu_busy_ms(fn, device: torch.device, calls: int, show: bool = False) -> float:
    """The GPU's kernel time per call of fn (torch profiler; after one call unprofiled); with
    `show`, the kernels that cost most are printed."""
    fn()
    sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if show:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15,
                                        max_name_column_width=70))
    return kernel_ms(cuda_kernels(prof), calls)


def cuda_kernels(prof) -> list:
    """A torch profiler's rows of GPU kernels alone (an operator's row repeats the time of the
    kernels it launched), the costliest first."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(kernels, key=lambda e: -e.self_device_time_total)


def kernel_ms(kernels: list, calls: int) -> float:
    """The GPU time of `kernels` per call, in ms."""
    return sum(e.self_device_time_total for e in kernels) / calls / 1000


def bench_harvest(device: torch.device, tokens: int, dtype: str, corpus: str | None) -> dict:
    """`moesae harvest` of `tokens` tokens with each way of reading the hook (--model-forward):
    auto (the model's own forward pass, the default) and bridge (TransformerLens), both with the
    default contexts a pass, then auto with 4× as many ("other_batch"), one after the other on
    one loaded model; the default run's numbers at the top level."""
    from engine.data.harvest import (
        HarvestConfig,
        contexts_per_shard,
        default_batch_contexts,
        harvest,
    )
    from engine.models import DEFAULT_MODEL, load_model

    lm = load_model(DEFAULT_MODEL, device=str(device), dtype=dtype)
    runs = {}
    batch = default_batch_contexts(device)
    other = 4 * batch
    for label, forward, contexts in (("bridge", "bridge", batch), ("auto", "auto", batch),
                                     ("other", "auto", other)):
        timings: dict = {}
        with tempfile.TemporaryDirectory(prefix="moesae-harvest-") as tmp:
            cfg = set_flat(HarvestConfig(), dict(tokens=tokens, out=str(Path(tmp) / "h"),
                                                 corpus=corpus, model_dtype=dtype,
                                                 device=str(device), model_forward=forward,
                                                 batch_contexts=contexts))
            t = time.perf_counter()
            store = harvest(cfg, progress=False, model=lm, timings=timings)
            secs = time.perf_counter() - t
            n = store.split("train").n_tokens + store.split("eval").n_tokens
        body = store.context_len - store.manifest["first_position"]
        at_most = min(contexts, contexts_per_shard(cfg.shard_mb, body, store.d_in, cfg.dtype))
        runs[label] = {"tokens": n, "seconds": secs, "tokens_per_s": n / secs,
                       "batch_contexts": contexts, "contexts_per_pass_at_most": at_most,
                       "main_thread_s": timings}
        print(f"harvest, --model-forward {forward}, {contexts} contexts a pass asked "
              f"({at_most} at most, a pass never crossing a shard): {n / secs:,.0f} "
              "tokens/s; main thread: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
              flush=True)
    checked = {h: ok for h, ok in lm._direct_ok.items()}
    # The forward pass alone, both ways interleaved (the harvests above also tokenise and
    # write, and ran one after the other): one 8-token context — nearly all host time on a
    # GPU — and one batch of the harvest's size (`default_batch_contexts`, 128 tokens each).
    g = torch.Generator().manual_seed(0)
    for label, shape, repeats in (("one_context_ms", (1, 8), 24), ("batch_ms", (batch, 128), 12)):
        toks = torch.randint(0, len(lm.tokenizer), shape, generator=g)
        toks[:, 0] = lm.bos_token_id or 0
        times = {"bridge": [], "auto": []}
        for r in range(repeats + 2):
            for forward in ("bridge", "auto") if r % 2 == 0 else ("auto", "bridge"):
                lm.forward = forward
                sync(device)
                t = time.perf_counter()
                lm.activations(toks, store.hook)
                sync(device)
                if r >= 2:  # two rounds of warm-up
                    times[forward].append(time.perf_counter() - t)
        for forward, ts in times.items():
            runs[forward][label] = 1000 * statistics.median(ts)
            if label == "batch_ms":
                runs[forward]["forward_tokens_per_s"] = shape[0] * shape[1] / statistics.median(ts)
        print(f"forward of {shape[0]}×{shape[1]} tokens: bridge {runs['bridge'][label]:.1f} ms, "
              f"auto {runs['auto'][label]:.1f} ms", flush=True)
    lm.forward = "auto"
    if device.type == "cuda":  # is the forward pass bound by the GPU or by the host issuing it?
        for contexts in sorted({batch, other}):
            toks = torch.randint(0, len(lm.tokenizer), (contexts, 128), generator=g)
            toks[:, 0] = lm.bos_token_id or 0
            busy = _gpu_busy_ms(lambda toks=toks: lm.activations(toks, store.hook), device, 3,
                                show=contexts == batch)
            runs["auto"][f"gpu_busy_ms_{contexts}"] = busy
            print(f"forward of {contexts}×128 tokens: the GPU busy {busy:.1f} ms of it "
                  f"({contexts * 128 / busy * 1000:,.0f} tokens/s if the host kept up)", flush=True)
    return {"model": cfg.source.model_name, "hook": store.hook, "model_dtype": dtype, **runs["auto"],
            "model_forward": "auto", "direct_path_used": checked.get(store.hook, False),
            "bridge": runs["bridge"], "other_batch": runs["other"],
            "ratio_to_bridge": runs["auto"]["tokens_per_s"] / runs["bridge"]["tokens_per_s"],
            "forward_ratio_to_bridge": runs["bridge"]["batch_ms"] / runs["auto"]["batch_ms"],
            "note": "includes tokenising the corpus (beside the forward passes after its first "
                    "block of 8,192 contexts)"}


def bench_stream(size: dict, device: torch.device, tokens: int, steps: int, batch: int,
                 corpus: str | None) -> dict:
    """Scale e=2 trained from a resident harvest vs straight from the model, same size."""
    from engine.data.harvest import HarvestConfig, harvest

    out = {}
    with tempfile.TemporaryDirectory(prefix="moesae-stream-") as tmp:
        common = dict(arch="scale", active=2, width=size["width"], experts=size["experts"],
                      k=size["k"], batch_tokens=batch, steps=steps, log_every=max(1, steps // 5),
                      checkpoint_every=steps, device=str(device), tokens=tokens, corpus=corpus,
                      model_dtype="bfloat16" if device.type == "cuda" else "float32")
        hcfg = set_flat(HarvestConfig(), {k: common[k] for k in ("tokens", "model_dtype", "device", "corpus")}
                        | {"out": str(Path(tmp) / "acts")})
        harvest(hcfg, progress=False)
        for name, extra in (("resident harvest", {"acts": hcfg.out, "batches": "resident"}),
                            ("stream from the model", {"buffer_tokens": min(tokens // 4, 1 << 21)})):
            cfg = set_flat(TrainConfig(), {**{k: v for k, v in common.items()
                                              if k not in ("tokens", "model_dtype", "corpus") or "acts" not in extra},
                                           **extra, "out": str(Path(tmp) / name.split()[0])})
            t = time.perf_counter()
            train(cfg, progress=False)
            out[name] = steps * batch / (time.perf_counter() - t)
            print(f"{name}: {out[name]:,.0f} tokens/s end to end", flush=True)
    out["ratio"] = out["stream from the model"] / out["resident harvest"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["steps"] if "tokens_per_s" in r and r["kernels"] == "fast"]
    rate = {(r["model"], r["precision"], r["kernels"]): r["tokens_per_s"] for r in result["steps"]
            if "tokens_per_s" in r}
    kinds = [k for k in ("reference", "fast", "fast, graph") if any(key[2] == k for key in rate)]
    labels = [f"{r['model']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    xs = range(len(rows))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs],
               [rate.get((r["model"], r["precision"], kind), 0) for r in rows], width,
               label=f"{kind} kernels" if kind != "fast, graph" else "fast kernels, one CUDA graph")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"One training step, {result['device']} ({result['size']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=list(SIZES), help="default: paper on a GPU, cpu on the CPU")
    ap.add_argument("--parts", default="step,trainer,harvest,stream")
    ap.add_argument("--steps", type=int, default=0, help="steps per step-time repeat")
    ap.add_argument("--repeats", type=int, default=0, help="default: 5 on a GPU, 3 on the CPU")
    ap.add_argument("--train-tokens", type=int, default=0, help="synthetic harvest size")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--harvest-tokens", type=int, default=0, help="harvest size (default: 5M on a GPU, as README table 7; 6k on the CPU)")
    ap.add_argument("--precisions", default="", help="e.g. bf16,fp32 (default: all the device has)")
    ap.add_argument("--corpus", default=None, help="corpus for the harvest parts (default: the built-in mix)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    size_name = args.size or ("paper" if gpu else "cpu")
    size = SIZES[size_name]
    precisions = [p for p in available_precisions(device)
                  if not args.precisions or p in args.precisions.split(",")]
    if not precisions:
        sys.exit(f"None of --precisions {args.precisions} is available on this device; "
                 f"available: {', '.join(available_precisions(device))}.")
    parts = set(args.parts.split(","))
    kept = keep_freed_memory()  # as the moesae command does
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if gpu
        else f"CPU {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "size": size_name, "config": size, "precisions": precisions,
        "steps": [], "trainer": [], "harvest": None, "stream": None,
        "allocator": allocator_label(kept),
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a run cut short keeps what it measured
        out.write_text(json.dumps(result, indent=2))

    if "step" in parts:
        print(f"step times at {size_name} size {size} on {result['device']}")
        bench_steps(size, device, precisions, args.steps or (20 if gpu else 2),
                    args.repeats or (5 if gpu else 3), result["steps"], save)
    if "trainer" in parts:
        bench_trainer(size, device, precisions, args.train_tokens or (5_000_000 if gpu else 300_000),
                      args.train_steps or (1000 if gpu else 60), result["steps"], result["trainer"], save)
    if "harvest" in parts:
        try:
            result["harvest"] = bench_harvest(device, args.harvest_tokens or (5_000_000 if gpu else 6000),
                                              "bfloat16" if gpu else "float32", args.corpus)
        except Exception as exc:  # e.g. no offline model here: said, not hidden
            traceback.print_exc()
            result["harvest"] = {"error": _error(exc)}
        print(result["harvest"], flush=True)
        save()
    if "stream" in parts:
        try:
            result["stream"] = bench_stream(size, device, 1_000_000 if gpu else 30_000,
                                            200 if gpu else 10, size["batch"] if gpu else 1024,
                                            args.corpus)
        except Exception as exc:  # e.g. no offline model here: said, not hidden
            traceback.print_exc()
            result["stream"] = {"error": _error(exc)}
            print(result["stream"], flush=True)
        save()
    save()
    if result["steps"]:
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
