"""Where the time goes on a GPU, for the work `bench_gpu.py` times as a whole.

step:    for each architecture at the paper's size in bf16 with the fast kernels: the eager step
         time, the GPU's busy time per step (the sum of its kernels' times; an eager step much
         longer than that waits on the host issuing kernels), the step replayed as one CUDA graph,
         and the kernels that cost most.
trainer: `moesae train` (bf16, Scale e=2) on a synthetic harvest under cProfile: where the
         wall time beyond the steps goes (loading, checkpoints, evaluation).
harvest: harvest tokens/s at several batch sizes, tokenisation alone, and a profile of the
         harvest loop (the main thread; the tokeniser and shard writer run beside it).
decoder: an A/B of the decoder in the trainer's step (bf16, recorded as a CUDA graph on a GPU):
         embedding_bag's own backward; the sparse backward (the values' gradient by the bag's
         own values kernel, W_dec's by the encoder's segmented sum over the picks sorted by
         feature); and that sparse backward with every segmented sum of the step as the
         Triton kernels of engine/sae/kernels.py (where triton runs); interleaved, for each
         architecture.
kernels: each Triton kernel alone at the size against the PyTorch it replaces (the segmented
         sums' embedding_bag; the decoder gradient's projection, the decoder's renormalisation
         and Feature Scaling's addcmul, each with the clones the timing needs), at each tile
         choice of a small sweep.
tail:    an A/B of the optimiser's tail in the trainer's step (bf16, recorded as a CUDA graph on
         a GPU): the decoder's projection, Adam step and renormalisation as one Triton pass
         and the encoder's Adam step as another (engine/training/schedule.py
         `FUSED_WEIGHT_STEP`, at a few tile sizes), the decoder's alone, and PyTorch's passes;
         interleaved, for each architecture; and for the routed ones the TopK
         over their candidates as the Triton row kernel (with and without its early exit)
         against `torch.topk`.
fusions: an A/B of this round's choices on CUDA in the trainer's step (bf16, recorded as a
         CUDA graph on a GPU), each undone alone and all together, for a routed SAE: Feature
         Scaling's three forms (`moe.CUDA_SCALING`: Ŵ formed with autograd, folded into the
         grouped GEMM's epilogue, or written once in bf16 with its backward in the encoder's
         segmented sum), the router's top experts by the Triton `top_experts` (against
         `torch.topk`), the row TopK's keys of 16-bit values as 32-bit integers (against
         64-bit), the grouped GEMM's layout and buffer from `expert_plan` and `pack_rows`
         (against a radix sort, small passes and a gather and `index_copy_`), x − b_gate and
         x − b_dec written once in bf16 (against float32 and a cast), b_dec's gradient through
         the encoder from the bf16 weights the products read (against the float32 master
         weights), what the TopK keeps of its picks from one pass (`kernels.picks`, against
         gathers and index passes) — these three for dense TopK too —, the backward over a
         routed SAE's picks from one pass (`kernels.pick_grads`, against a gather, a where
         and scatter-adds); and the same SAE without Feature Scaling, what its forms could at most save.
         Dense TopK's step, which runs none of them, timed beside for the ratio. (The previous
         round's A/B — the loss, the decode's bias, the decoder's gradients, the encoder's bf16
         rows, the loss kernel's tiles — is in `benchmarks/results/profile-gpu-h100-f1862c3.json`
         and `-dbf0323.json`.)
compile: the model's own forward pass, eager against torch.compile (how much fusing would save).
topk:    TopK alone over the dense and the Scale e=2 candidates, one `torch.topk` against the
         two-stage form with several chunk counts; then the dense TopK step with the fastest.

    python benchmarks/profile_gpu.py --parts step
    python benchmarks/profile_gpu.py --parts decoder --archs "topk,scale e=2"
    python benchmarks/profile_gpu.py --parts kernels
    python benchmarks/profile_gpu.py --parts tail --archs "topk,scale e=2"
    python benchmarks/profile_gpu.py --parts fusions --archs "topk,scale e=2"
    python benchmarks/profile_gpu.py --parts topk --archs topk
    python benchmarks/profile_gpu.py --parts harvest --corpus corpus.jsonl --tokens 2000000
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import (  # noqa: E402
    ARCHS,
    SIZES,
    cuda_kernels,
    kernel_ms,
    median_step_ms,
    step_fn,
    sync,
)
from engine.options import set_flat  # noqa: E402
from engine.sae import SAEConfig  # noqa: E402


def _batches(size: dict, device: torch.device, n: int) -> list:
    """n seeded batches of random activations of the size's shape, on the device."""
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(size["batch"], size["d"], device=device, generator=g) for _ in range(n)]


def _configs(size: dict, archs: list[str]):
    """(name, SAEConfig) of each architecture of ARCHS named in `archs`, at the size."""
    for name, kw in ARCHS:
        if name in archs:
            yield name, SAEConfig(d_in=size["d"], width=size["width"], experts=size["experts"],
                                  k=size["k"], **kw)


def profile_steps(size: dict, device: torch.device, archs: list[str], out: dict) -> None:
    xs = _batches(size, device, 20)
    for name, cfg in _configs(size, archs):
        row: dict = {"model": name, "precision": "bf16", "kernels": "fast"}
        out["steps"].append(row)
        try:
            fn = step_fn(cfg, device, "bf16", "fast")
            fn(xs[0])
            fn(xs[1])
            row["eager_ms"] = median_step_ms(fn, xs, device, 3)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for x in xs[:10]:
                    fn(x)
                sync(device)
            kernels = cuda_kernels(prof)
            row["gpu_busy_ms"] = kernel_ms(kernels, 10)
            row["kernels_per_step"] = sum(e.count for e in kernels) / 10
            row["top_kernels"] = [{"name": e.key[:160], "ms_per_step": kernel_ms([e], 10),
                                   "per_step": e.count / 10} for e in kernels[:30]]
            print(f"== {name}: eager {row['eager_ms']:.2f} ms, GPU busy {row['gpu_busy_ms']:.2f} ms a step")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22,
                                            max_name_column_width=70))
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        try:
            graphed = step_fn(cfg, device, "bf16", "fast", graph=True)
            graphed(xs[0])
            row["graph_ms"] = median_step_ms(graphed, xs, device, 3)
            print(f"== {name}: CUDA graph {row['graph_ms']:.2f} ms a step")
        except Exception as exc:
            traceback.print_exc()
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


def _ab_steps(cfg: SAEConfig, device: torch.device, variants: dict, xs: list, rounds: int) -> dict:
    """Median step ms of the bf16 fast step (recorded as a CUDA graph on a GPU) under each
    variant — `variants[label]()` sets that variant up and returns the function undoing it —
    measured in `rounds` interleaved rounds: {label: ms}, and every round's times."""
    return _ab_cases({label: (cfg, setup) for label, setup in variants.items()}, device, xs, rounds)


def _ab_cases(cases: dict, device: torch.device, xs: list, rounds: int) -> dict:
    """`_ab_steps` with a configuration of its own for each variant: cases[label] = (cfg,
    setup)."""
    graph = device.type == "cuda"
    fns = {}
    for label, (cfg, setup) in cases.items():
        undo = setup()
        try:
            fns[label] = step_fn(cfg, device, "bf16", "fast", graph=graph)
            fns[label](xs[0])  # eager warm-up, or the recording, with this variant
        finally:
            undo()
    times: dict = {label: [] for label in cases}
    for _ in range(rounds):
        for label, fn in fns.items():  # a recorded graph keeps the variant it recorded
            undo = cases[label][1]()
            try:
                times[label].append(median_step_ms(fn, xs, device, 1))
            finally:
                undo()
    return {"ms": {label: statistics.median(t) for label, t in times.items()}, "all_ms": times}


def _ms_line(title: str, ms: dict) -> str:
    """"== title: label 1.234 ms, …" for a dict of milliseconds by label."""
    return f"== {title}: " + ", ".join(f"{label} {v:.3f} ms" for label, v in ms.items())


def _patched(module, name: str, value):
    """A variant for `_ab_steps`: module.name = value until undone."""
    return _patched_all([(module, name, value)])


def _patched_all(changes: list):
    """A variant for `_ab_steps`: each (module, name, value) set until undone."""
    def setup():
        olds = [(module, name, getattr(module, name)) for module, name, _ in changes]
        for module, name, value in changes:
            setattr(module, name, value)
        return lambda: [setattr(module, name, old) for module, name, old in olds]
    return setup


def _decoder_variants(device: torch.device) -> dict:
    """The decoder backwards of the A/B (module docstring), each a `_patched_all` variant; the
    Triton kernels where they run (CUDA with triton, or its interpreter)."""
    import engine.sae.base as sae_base
    from engine.sae import kernels, moe

    def chosen(decode, triton: bool):
        return _patched_all([(sae_base, "picks_decoder", lambda dev, dtype: decode),
                             (kernels, "ENABLED", {device.type: triton})])

    variants = {"bag backward": chosen(moe.decode_picks, False),
                "segmented sum": chosen(moe.decode_picks_sddmm, False)}
    if kernels.available(device) or kernels.interpreted():
        variants["triton"] = chosen(moe.decode_picks_sddmm, True)
        variants["triton, clip apart"] = _patched_all([
            (sae_base, "picks_decoder", lambda dev, dtype: moe.decode_picks_sddmm),
            (kernels, "ENABLED", {device.type: True}),
            (torch.nn.utils, "get_total_norm", None)])  # clipped_step falls back to clip_grad_norm_
    return variants


def profile_decoders(size: dict, device: torch.device, archs: list[str], out: dict,
                     rounds: int = 3) -> None:
    """The step with each decoder backward (module docstring), `rounds` interleaved medians."""
    import engine.sae.base as sae_base
    from engine.sae import kernels

    variants = _decoder_variants(device)
    xs = _batches(size, device, 10)
    for name, cfg in _configs(size, archs):
        row: dict = {"model": name, "precision": "bf16", "graph": device.type == "cuda",
                     "default": sae_base.picks_decoder(device, torch.float32).__name__,
                     "default_triton": kernels.use(torch.empty(0, device=device))}
        out["decoder_ab"].append(row)
        try:
            row.update(_ab_steps(cfg, device, variants, xs, rounds))
            print(_ms_line(f"decoder A/B, {name}", row["ms"]) + " a step", flush=True)
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _tail_variants(device: torch.device) -> dict:
    """The optimiser tails of the A/B (module docstring), each a `_patched_all` variant:
    PyTorch's passes; the decoder's fused pass with fused Adam for the encoder; both weights'
    fused passes at the default tiles and a few others."""
    from engine.sae import kernels
    from engine.training import schedule

    variants = {"pytorch passes": _patched(schedule, "FUSED_WEIGHT_STEP", False)}
    if kernels.available(device) or kernels.interpreted():
        variants["fused decoder, Adam's encoder"] = _patched_all([
            (schedule, "FUSED_WEIGHT_STEP", True), (schedule, "FUSED_ENCODER_ADAM", False)])
        for elems, warps in ((kernels.BLOCKS["adam_elems"], kernels.BLOCKS["adam_warps"]),
                             (1024, 2), (2048, 4), (2048, 8)):
            label = f"fused both, {elems} elements, {warps} warps"
            if label not in variants:
                variants[label] = _patched_all([
                    (schedule, "FUSED_WEIGHT_STEP", True), (schedule, "FUSED_ENCODER_ADAM", True),
                    (kernels, "BLOCKS", {**kernels.BLOCKS, "adam_elems": elems, "adam_warps": warps})])
    return variants


def _row_topk_variants(device: torch.device) -> dict:
    """The routed SAEs' TopK of the A/B: the Triton row kernel with its early exit, the same
    with a full bisection, and `torch.topk` (the kernel's row limit set to 0)."""
    from engine.sae import kernels

    variants = {"torch.topk": _patched(kernels, "TOPK_MAX_N", 0)}
    if kernels.available(device) or kernels.interpreted():
        variants["row kernel, early exit"] = _patched(kernels, "BLOCKS", {**kernels.BLOCKS, "topk_early": 1})
        variants["row kernel, full bisection"] = _patched(kernels, "BLOCKS", {**kernels.BLOCKS, "topk_early": 0})
    return variants


def profile_tail(size: dict, device: torch.device, archs: list[str], out: dict,
                 rounds: int = 3) -> None:
    """The step with each optimiser tail (module docstring), `rounds` interleaved medians."""
    xs = _batches(size, device, 10)
    for name, cfg in _configs(size, archs):
        row: dict = {"model": name, "precision": "bf16", "graph": device.type == "cuda"}
        out["tail_ab"].append(row)
        try:
            row.update(_ab_steps(cfg, device, _tail_variants(device), xs, rounds))
            print(_ms_line(f"tail A/B, {name}", row["ms"]) + " a step", flush=True)
            if cfg.arch != "topk":  # dense TopK's rows are longer than the row kernel takes
                row["row_topk"] = _ab_steps(cfg, device, _row_topk_variants(device), xs, rounds)
                print(_ms_line(f"row TopK A/B, {name}", row["row_topk"]["ms"]) + " a step", flush=True)
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _fusion_variants(scale: bool) -> dict:
    """This round's choices on CUDA each undone alone, then all together (module docstring,
    `fusions`), each a `_patched_all` variant; a dense TopK SAE runs only the three it shares
    with the routed ones."""
    from engine.sae import kernels, moe

    shared = {
        "x − centre in float32, then cast": [(moe, "ROUND_CENTRED_ROWS", False)],
        "centre's gradient from float32 W": [(moe, "CENTRE_GRAD_FROM_PRODUCTS", False)],
        "picks: gathers and index passes": [(moe, "FUSED_PICKS", False)],
    }
    undone = shared if not scale else {
        "Feature Scaling: Ŵ formed with autograd": [(moe, "CUDA_SCALING", "formed")],
        "routing: torch.topk": [(kernels, "top_experts_takes", lambda *a: False)],
        "row TopK: 64-bit keys": [(kernels, "BLOCKS", {**kernels.BLOCKS, "topk_narrow": 0})],
        "GEMM layout: sort + passes": [(moe, "FUSED_EXPERT_PLAN", False)],
        **shared,
        "picks' backward: gather, where, scatters": [(moe, "FUSED_PICK_GRADS", False)],
    }
    variants = {"the default": _patched_all([])}
    variants.update({label: _patched_all(changes) for label, changes in undone.items()})
    if scale:
        variants["Feature Scaling: in the GEMM's epilogue"] = _patched(moe, "CUDA_SCALING",
                                                                       "epilogue")
        variants["Feature Scaling: in the segmented sums"] = _patched(moe, "CUDA_SCALING", "sums")
        variants["none of them (as at 7e070ee)"] = _patched_all(
            [c for cs in undone.values() for c in cs])
    return variants


def profile_fusions(size: dict, device: torch.device, archs: list[str], out: dict,
                    rounds: int = 5) -> None:
    """The step with each fused pass of this round undone, interleaved (module docstring);
    for Scale SAEs also the same SAE without Feature Scaling, what its fold can at most save."""
    import dataclasses

    from engine.sae import kernels

    xs = _batches(size, device, 10)
    for name, cfg in _configs(size, archs):
        row: dict = {"model": name, "precision": "bf16", "graph": device.type == "cuda",
                     "triton": kernels.use(torch.empty(0, device=device))}
        out["fusions_ab"].append(row)
        try:
            cases = {label: (cfg, setup) for label, setup in
                     _fusion_variants(cfg.arch == "scale" and cfg.feature_scaling).items()}
            if cfg.arch == "scale" and cfg.feature_scaling:
                cases["without Feature Scaling"] = (dataclasses.replace(cfg, feature_scaling=False),
                                                    _patched_all([]))
            row.update(_ab_cases(cases, device, xs, rounds))
            print(_ms_line(f"fusions A/B, {name}", row["ms"]) + " a step", flush=True)
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_kernels(size: dict, device: torch.device, out: dict, rounds: int = 5,
                    sweep: bool = True) -> None:
    """The three segmented sums of a step alone at the size (float32 weights, random picks):
    `embedding_bag` (and its values kernel) against the Triton kernels, the latter at each
    tile choice of a small sweep; interleaved medians."""
    import itertools

    from engine.sae import kernels, moe

    B, k, M, d = size["batch"], size["k"], size["width"], size["d"]
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(M, d, device=device, generator=g)
    x = torch.randn(B, d, device=device, generator=g)
    gx = torch.randn(B, d, device=device, generator=g)
    idx = torch.randint(0, M, (B, k), device=device, generator=g)
    acts = torch.rand(B, k, device=device, generator=g)
    offsets = torch.arange(0, B * k + 1, k, device=device)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.cumsum(moe.expert_counts(flat, M), 0)
    seg_off = torch.cat([ends.new_zeros(1), ends])
    tokens, w_sorted = order // k, acts.reshape(-1)[order]
    bag_of_pick = torch.arange(B, device=device).repeat_interleave(k)

    def with_blocks(fn, **blocks):
        def run():
            old = dict(kernels.BLOCKS)
            kernels.BLOCKS.update(blocks)
            try:
                return fn()
            finally:
                kernels.BLOCKS.clear()
                kernels.BLOCKS.update(old)
        return run

    seg_grid = [dict(segment_d=bd, segment_p=bp, segment_warps=nw)
                for bd, bp, nw in itertools.product((128, 256, 512), (8, 16, 32), (1, 2))] if sweep else []
    dots_grid = [dict(dots_d=bd, dots_warps=nw)
                 for bd, nw in itertools.product((16, 32, 64), (1, 2))] if sweep else []
    G, Wn = torch.randn(M, d, device=device, generator=g), W / W.norm(dim=1, keepdim=True)
    N = size["experts"]
    s_e, c_e = torch.rand(N, device=device, generator=g), torch.randn(N, 1, d, device=device, generator=g)
    row_grid = [dict(row_elems=e, row_warps=nw) for e, nw in itertools.product((2048, 4096, 8192), (4, 8))] if sweep else []
    shapes = {
        "decode": ({"embedding_bag": lambda: torch.nn.functional.embedding_bag(
            idx, W, per_sample_weights=acts, mode="sum")},
            lambda: kernels.segment_sum(W, flat, acts.reshape(-1), offsets), seg_grid),
        "scatter": ({"embedding_bag": lambda: torch.nn.functional.embedding_bag(
            tokens, x, seg_off[:-1], mode="sum", per_sample_weights=w_sorted)},
            lambda: kernels.segment_sum(x, tokens, w_sorted, seg_off), seg_grid),
        "dots": ({"embedding_bag": lambda: moe._BAG_WEIGHTS_GRAD(
            gx, W, flat, offsets[:-1], bag_of_pick, 0, -1)},
            lambda: kernels.picked_dots(gx, W, idx), dots_grid),
        "project": ({"pytorch": lambda: G.clone().addcmul_(torch.linalg.vecdot(G, Wn)[:, None], Wn, value=-1)},
                    lambda: kernels.project_rows_(G.clone(), Wn), row_grid),
        "unit rows": ({"pytorch": lambda: W.clone().div_(W.norm(dim=1, keepdim=True).clamp_min(1e-8))},
                      lambda: kernels.unit_rows_(W.clone()), row_grid),
        "affine": ({"pytorch": lambda: torch.addcmul(c_e, W.view(N, -1, d), s_e[:, None, None])},
                   lambda: kernels.group_affine(W.view(N, -1, d), s_e, c_e), row_grid),
    }
    for shape, (fns, triton_fn, grid) in shapes.items():
        fns = dict(fns)
        for blocks in [{}, *grid]:  # {}: the tiles kernels.BLOCKS holds
            label = "triton " + (",".join(f"{key}={v}" for key, v in blocks.items()) or "default")
            fns[label] = with_blocks(triton_fn, **blocks)
        times: dict = {label: [] for label in fns}
        for _ in range(rounds):
            for label, fn in fns.items():
                times[label].append(_time_ms(fn, device))
        ms = {label: statistics.median(t) for label, t in times.items()}
        base = next(iter(fns))  # the PyTorch form
        best = min((label for label in ms if label != base), key=ms.get)
        out["kernels"].append({"shape": shape, "B": B, "k": k, "M": M, "d": d, "ms": ms,
                               "fastest_triton": best})
        print(f"== kernels, {shape}: {base} {ms[base]:.3f} ms, fastest "
              f"{best} {ms[best]:.3f} ms, the default {ms['triton default']:.3f} ms; all: "
              + ", ".join(f"{label.removeprefix('triton ')} {v:.3f}" for label, v in ms.items()),
              flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_ms(fn, device: torch.device, calls: int = 20) -> float:
    """Mean ms of `calls` calls of fn, after one."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t) / calls * 1000


def profile_compile(device: torch.device, contexts: int, out: dict, model: str | None = None,
                    calls: int = 5) -> None:
    """The model's own forward pass through every layer (the decoder stack, SDPA attention, no
    LM head) on `contexts` contexts of 128 tokens, eager against `torch.compile`d: how much
    fusing the element-wise work between its matmuls would save the harvest and the stream."""
    from engine.hf_forward import DirectForward
    from engine.models import DEFAULT_MODEL, load_model

    gpu = device.type == "cuda"
    lm = load_model(model or DEFAULT_MODEL, device=str(device), dtype="bfloat16" if gpu else "float32")
    root = DirectForward.of(lm.model).root
    stack = getattr(root, "model", root)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, len(lm.tokenizer), (contexts, 128), generator=g).to(device)
    row: dict = {"model": lm.name, "contexts": contexts, "layers": lm.n_layers}
    out["compile"] = row
    with torch.no_grad():
        row["eager_ms"] = _time_ms(lambda: stack(input_ids=toks, use_cache=False), device, calls)
        try:
            t = time.perf_counter()
            compiled = torch.compile(stack)
            compiled(input_ids=toks, use_cache=False)
            sync(device)
            row["compile_s"] = time.perf_counter() - t
            row["compiled_ms"] = _time_ms(lambda: compiled(input_ids=toks, use_cache=False), device, calls)
            row["speedup"] = row["eager_ms"] / row["compiled_ms"]
            print(f"== the model's forward, {contexts}×128 tokens, {lm.n_layers} layers: eager "
                  f"{row['eager_ms']:.1f} ms, compiled {row['compiled_ms']:.1f} ms "
                  f"({row['speedup']:.2f}x; compiling took {row['compile_s']:.0f} s)", flush=True)
        except Exception as exc:  # a backend this machine lacks: said, not hidden
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]


def profile_topk(size: dict, device: torch.device, archs: list[str], out: dict,
                 rounds: int = 5) -> None:
    """TopK alone over [batch, n] bf16 candidates — n = M (dense TopK) and n = e·m (Scale
    e=2) — as one `torch.topk` and in two stages (`topk_chunked`) with several chunk counts,
    interleaved medians; then the dense TopK step (recorded) with one topk against the
    fastest two-stage form ("step_ab")."""
    from engine.sae import moe

    k, B = size["k"], size["batch"]
    for n in (size["width"], 2 * size["width"] // size["experts"]):
        f = torch.randn(B, n, device=device).to(torch.bfloat16)
        fns = {"one topk": lambda f=f: f.topk(k, dim=-1, sorted=False)}
        for width in (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 3072, 6144):
            if n % width == 0 and width >= k and n // width > 1:  # as topk_candidates asks
                fns[f"two-stage, slices of {width}"] = lambda f=f, c=n // width: moe.topk_chunked(f, k, c)
        times: dict = {label: [] for label in fns}
        for _ in range(rounds):
            for label, fn in fns.items():
                times[label].append(_time_ms(fn, device))
        ms = {label: statistics.median(t) for label, t in times.items()}
        best = min(ms, key=ms.get)
        row = {"n": n, "batch": B, "k": k, "ms": ms, "fastest": best}
        out["topk"].append(row)
        print(_ms_line(f"topk over {B}x{n} bf16", ms) + f"; fastest: {best}", flush=True)
        staged = [label for label in ms if label != "one topk"]
        if n == size["width"] and staged and "topk" in archs:
            best = min(staged, key=ms.get)  # the step A/B: one topk against the best two-stage
            width = int(best.split()[-1])
            xs = _batches(size, device, 10)
            _, cfg = next(_configs(size, ["topk"]))
            try:
                ab = _ab_steps(cfg, device, {"one topk": _patched(moe, "TOPK_SLICE", {}),
                                             best: _patched(moe, "TOPK_SLICE", {device.type: width})},
                               xs, 3)
                row["step_ab"] = ab
                print(f"== dense TopK step: one topk {ab['ms']['one topk']:.3f} ms, {best} "
                      f"{ab['ms'][best]:.3f} ms", flush=True)
            except Exception as exc:
                traceback.print_exc()
                row["step_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del f
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_trainer(size: dict, device: torch.device, tokens: int, steps: int, out: dict) -> None:
    from benchmarks.synthetic import synthetic_harvest
    from engine.training.config import TrainConfig
    from engine.training.trainer import train

    with tempfile.TemporaryDirectory(prefix="moesae-prof-") as tmp:
        t = time.perf_counter()
        acts = synthetic_harvest(Path(tmp) / "acts", tokens, size["d"])
        made = time.perf_counter() - t
        cfg = set_flat(TrainConfig(), dict(
            acts=str(acts.path), out=str(Path(tmp) / "run"), arch="scale", active=2,
            width=size["width"], experts=size["experts"], k=size["k"], batch_tokens=size["batch"],
            steps=steps, log_every=max(1, steps // 10), checkpoint_every=steps, device=str(device)))
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        run = train(cfg, progress=False)
        prof.disable()
        wall = time.perf_counter() - t
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
        rates = [r["tokens_per_s"] for r in log if r["kind"] == "train"]
    out["trainer"] = {"tokens": tokens, "steps": steps, "synthetic_seconds": made, "wall_seconds": wall,
                      "wall_tokens_per_s": steps * size["batch"] / wall,
                      "logged_tokens_per_s": statistics.median(rates[1:] or rates)}
    print(out["trainer"], flush=True)
    pstats.Stats(prof).sort_stats("cumtime").print_stats(35)


def profile_harvest(device: torch.device, tokens: int, corpus: str | None, batches: list[int],
                    out: dict) -> None:
    from engine.data.corpus import context_blocks, load_corpus
    from engine.data.harvest import HarvestConfig, harvest
    from engine.models import load_model

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    lm = load_model(None, device=str(device), dtype=dtype)
    docs = load_corpus(corpus)
    t = time.perf_counter()
    n = sum(b.tokens.size for b in context_blocks(lm, docs, 128, tokens, 0))
    secs = time.perf_counter() - t
    out["tokenise"] = {"tokens": n, "seconds": secs, "tokens_per_s": n / secs}
    print("tokenise alone:", out["tokenise"], flush=True)
    for i, batch in enumerate(batches):
        with tempfile.TemporaryDirectory(prefix="moesae-prof-") as tmp:
            cfg = set_flat(HarvestConfig(), dict(tokens=tokens, out=str(Path(tmp) / "h"), corpus=corpus,
                                                 model_dtype=dtype, device=str(device),
                                                 batch_contexts=batch))
            prof = cProfile.Profile() if i == len(batches) - 1 else None
            t = time.perf_counter()
            if prof:
                prof.enable()
            harvest(cfg, progress=False, model=lm)
            if prof:
                prof.disable()
            secs = time.perf_counter() - t
        out["harvest"].append({"batch_contexts": batch, "tokens": tokens, "seconds": secs,
                               "tokens_per_s": tokens / secs, "profiled": prof is not None})
        print(out["harvest"][-1], flush=True)
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="step")
    ap.add_argument("--size", choices=list(SIZES), default="paper")
    ap.add_argument("--archs", default="topk,switch,scale e=2")
    ap.add_argument("--train-tokens", type=int, default=5_000_000)
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="harvest tokens")
    ap.add_argument("--batches", default="64,256", help="harvest contexts per forward pass")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--compile-contexts", type=int, default=1024, help="contexts of the compile part")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile-gpu.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": [], "trainer": None, "harvest": [],
              "decoder_ab": [], "tail_ab": [], "fusions_ab": [], "topk": [], "kernels": []}
    parts = set(args.parts.split(","))
    if "step" in parts:
        profile_steps(SIZES[args.size], device, args.archs.split(","), result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "decoder" in parts:
        profile_decoders(SIZES[args.size], device, args.archs.split(","), result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "tail" in parts:
        profile_tail(SIZES[args.size], device, args.archs.split(","), result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "fusions" in parts:
        profile_fusions(SIZES[args.size], device, args.archs.split(","), result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "kernels" in parts:
        profile_kernels(SIZES[args.size], device, result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "topk" in parts:
        profile_topk(SIZES[args.size], device, args.archs.split(","), result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "compile" in parts:
        profile_compile(device, args.compile_contexts, result)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "trainer" in parts:
        try:
            profile_trainer(SIZES[args.size], device, args.train_tokens, args.train_steps, result)
        except Exception:
            traceback.print_exc()
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "harvest" in parts:
        try:
            profile_harvest(device, args.tokens, args.corpus,
                            [int(b) for b in args.batches.split(",")], result)
        except Exception:
            traceback.print_exc()
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
