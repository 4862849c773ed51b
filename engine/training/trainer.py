"""The trainer shared by every architecture (METHOD.md §3 "shared training recipe").

One loop for dense TopK, Switch and Scale so that comparisons are fair. It takes its batches
from a `BatchSource` — a harvest folder (engine.data.batches) or the model itself
(engine.data.stream) — and keeps everything on disk in a `RunFolder`. `train_many` trains
several SAEs in lockstep on one source: one pass of the model feeds them all.

A run killed with `kill -9` and started again with the same command resumes from its last
checkpoint and finishes with the same number of steps, seeing the same data it would have
seen (batches depend only on seed and step; the Adam state and the source's position are
checkpointed).

Nothing inside a step waits for the device: losses, expert load, firing counts and the
first non-finite loss accumulate on it and are read at log and checkpoint steps only. Two
consequences: a NaN is reported at the next log step (with the step it happened at; the
last good checkpoint is kept), and AuxK starts at the first log step at which a feature is
dead (whether any is, and k_aux = min(d/2, the most dead features one token can choose
among, rounded up to a power of two) are read there).

On CUDA the step is recorded once as a CUDA graph and replayed (`StepRecorder`,
`--cuda-graph`); everything that lasts between steps is changed in place for that.

Under `torchrun` (engine.training.distributed) each process trains on its slice of every
global batch; rank 0 alone writes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..data.batches import BatchSource, harvest_batches
from ..errors import ConfigError, TrainingError
from ..runtime import Runtime, RuntimeConfig, resolve
from ..sae import SparseAutoencoder, build_sae, registry
from .config import CUDA_GRAPH, TrainConfig
from .distributed import Dist, from_environment
from .log import Window, redundancy_row
from .run_folder import RunFolder
from .schedule import lr_at, lr_for_width, make_adam, optimiser_step


def check_config(cfg: TrainConfig) -> None:
    """One sentence for anything impossible, before anything heavy is loaded."""
    if not cfg.out:
        raise ConfigError("Give the run folder with --out.")
    for name in ("steps", "batch_tokens", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer.")
    if not 0 <= cfg.decay_fraction <= 1:
        raise ConfigError("--decay-fraction must be between 0 and 1.")
    if not registry.get(cfg.sae.arch).trainable:
        raise ConfigError(
            f"A {cfg.sae.arch} SAE cannot be trained here; choose one of "
            f"{', '.join(registry.trainable())}."
        )
    if cfg.kernels not in ("fast", "reference"):
        raise ConfigError(f"Unknown kernels '{cfg.kernels}'; choose fast or reference.")
    if cfg.cuda_graph not in CUDA_GRAPH:
        raise ConfigError(f"Unknown --cuda-graph '{cfg.cuda_graph}'; choose {', '.join(CUDA_GRAPH)}.")


def use_cuda_graph(cfg: TrainConfig, sae: SparseAutoencoder, rt: Runtime, dist: Dist) -> bool:
    """Whether the step is recorded as a CUDA graph: `auto` where it can be (CUDA, one process,
    a step that never reads the device on the host — see `step_waits_for_device`); `on` where
    it cannot is refused in one sentence."""
    blocker = None
    if rt.device.type != "cuda":
        blocker = "it needs a CUDA device"
    elif dist.enabled:
        blocker = "it is not used with several processes"
    elif sae.step_waits_for_device(rt.device, rt.compute_dtype):
        blocker = ("the reference kernels wait for the device inside a step" if cfg.kernels != "fast"
                   else f"the experts' matmuls in {rt.precision} are a loop that waits for the device "
                        f"on this GPU (one grouped GEMM needs bf16 on Hopper or Blackwell)")
    if cfg.cuda_graph == "on" and blocker:
        raise ConfigError(f"--cuda-graph on cannot be used here: {blocker}; use --cuda-graph auto or off.")
    return cfg.cuda_graph != "off" and blocker is None


class StepRecorder:
    """The trainer's only contact with CUDA graphs (so a test can stand in for it on the CPU):
    `eager(fn)` runs a step on a side stream, as warm-up before recording must; `record(fn)`
    records fn once — running nothing — and returns what replays it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def eager(self, fn) -> None:
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            fn()
        main.wait_stream(self.side)

    def record(self, fn):
        graph = torch.cuda.CUDAGraph()
        # thread_local: a batch source's prefetch thread may allocate and copy meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        return graph.replay


class Trainer:
    """The training of one SAE: `start`, then `step` for each step, then `finish`."""

    def __init__(self, cfg: TrainConfig, source: BatchSource, rt: Runtime, dist: Dist,
                 progress: bool = True):
        check_config(cfg)
        self.cfg, self.source, self.rt, self.dist = cfg, source, rt, dist
        self.progress = progress
        self.device = rt.device
        self.d_in = source.d_in
        self.sae_cfg = replace(cfg.sae, d_in=self.d_in).normalised().validate()
        self.lr = cfg.lr if cfg.lr is not None else lr_for_width(self.sae_cfg.width)
        # x_norm = scale · x_raw; without normalisation the SAE reads raw activations
        self.scale = source.norm_scale if cfg.normalise else 1.0
        self.unscale = 1.0 if cfg.normalise else 1.0 / source.norm_scale
        if cfg.lb_weight_raw is not None:  # their MSE is raw, ours scaled by s²: α = s²·α_raw
            self.lb_weight = cfg.lb_weight_raw * self.scale**2
        else:
            self.lb_weight = cfg.lb_weight if cfg.lb_weight is not None else 0.01 * self.d_in
        self.run = RunFolder(cfg.out)
        self.done = False
        self.bar = None

    def _meta(self) -> dict:
        return {**self.source.describe(), "d_in": self.d_in, "train_config": self.cfg.identity()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- start --------------------------------------------------------------------------------
    def start(self) -> int:
        """Build or restore the SAE; returns the first step still to train (steps when done)."""
        cfg, run, dist = self.cfg, self.run, self.dist
        with torch.device("meta"):  # the architecture alone, to refuse `--cuda-graph on` where
            probe = build_sae(self.sae_cfg)  # it cannot apply before the run folder is claimed
        probe.kernels = cfg.kernels
        self.graphed = use_cuda_graph(cfg, probe, self.rt, dist)
        if dist.is_main:
            run.claim(cfg.identity(), cfg.to_dict())
        dist.barrier()
        if not dist.is_main:
            run.claim(cfg.identity(), cfg.to_dict())  # reads only: the folder exists now
        if run.is_finished():
            self.done = True
            return cfg.steps
        torch.manual_seed(cfg.seed)
        sae: SparseAutoencoder = build_sae(self.sae_cfg).to(self.device)
        sae.kernels = cfg.kernels
        sae.input_scale.fill_(self.scale)
        self.sae = sae
        # The step reads its number and (when recorded as a graph) its lr from the device.
        self.step_t = torch.zeros((), dtype=torch.long, device=self.device)
        self.lr_t = torch.full((), self.lr, device=self.device) if self.graphed else None
        self.opt = make_adam(sae.parameters(), self.lr_t if self.graphed else self.lr,
                             capturable=self.graphed)
        self.since_fired = torch.zeros(self.sae_cfg.width, dtype=torch.long, device=self.device)
        self.start_step = 0
        if run.has_state():
            self.start_step, extra = run.load_state(sae, self.opt, self.device)
            self.since_fired.copy_(extra["since_fired"])
            for group in self.opt.param_groups:  # as this run needs them, whatever wrote it
                group["capturable"] = self.graphed
                group["lr"] = self.lr_t if self.graphed else self.lr
            if dist.is_main:
                print(f"resumed {run.path} from step {self.start_step:,} of {cfg.steps:,}",
                      file=sys.stderr, flush=True)
        else:
            # METHOD §3: b_dec (and the router's centring bias) at the geometric median of the
            # first 4,096 tokens of the first (global) batch.
            sae.init_biases(self._global_rows(self.source.batch(0), 4096) * self.unscale)
        self.model = sae
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(sae, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if dist.is_main:
            run.truncate_log(self.start_step)
        self.window = Window(self.sae_cfg.experts, self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.k_aux = self._aux_picks(self.since_fired > cfg.dead_tokens)
        self.replay, self.static_x, self.warm, self.recordings = None, None, 0, 0
        self.recorder = StepRecorder(self.device) if self.graphed else None
        self.last_good = self.start_step
        self.bar = None
        if self.progress and dist.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.steps, initial=self.start_step,
                            desc=f"train {self.sae_cfg.arch}", unit="step")
        self._sync()
        self.t_last, self.tokens_since = time.perf_counter(), 0
        return self.start_step

    def _aux_picks(self, dead: torch.Tensor) -> int:
        """AuxK's k_aux = min(d/2, the most dead features a token can choose among, rounded up
        to a power of two), 0 when AuxK is off or nothing is dead; refreshed at log steps (it
        reads the device). The rounding adds only zero picks (nothing to the loss or any
        gradient) and bounds how often a step recorded as a CUDA graph, whose pick count is
        built in, is recorded again: at most log2(d/2) times in a run."""
        if self.cfg.auxk_alpha <= 0:
            return 0
        bound = self.sae.dead_candidates_bound(dead)
        return min(self.d_in // 2, 1 << (bound - 1).bit_length()) if bound else 0

    def _global_rows(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The first n rows of the global batch whose local slice is x."""
        if not self.dist.enabled:
            return x[:n]
        import torch.distributed as td

        parts = [torch.empty_like(x) for _ in range(self.dist.world)]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)[:n]

    # -- one step -----------------------------------------------------------------------------
    def step(self, step: int, x: torch.Tensor) -> None:
        """One optimisation step on x, this process's [batch_tokens / processes, d] slice."""
        cfg, dist = self.cfg, self.dist
        if step < self.start_step or self.done:
            return
        lr = lr_at(step, cfg.steps, self.lr, cfg.decay_fraction)
        self.step_t.fill_(step)
        if self.graphed:
            self.lr_t.fill_(lr)
            self._graphed_step(x)
        else:
            for group in self.opt.param_groups:
                group["lr"] = lr
            self._device_step(x)
        global_tokens = x.shape[0] * dist.world
        self.tokens_since += global_tokens
        if self.bar is not None:
            self.bar.update(1)
        done = step + 1
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        ckpt_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if log_now or ckpt_now:
            self._report(done, lr, log_now, ckpt_now)

    def _device_step(self, x: torch.Tensor) -> None:
        """All of a step's work on the device. It reads the step's number and lr from device
        tensors and changes everything that lasts between steps in place (weights, Adam state,
        firing counts, the log window, the first non-finite step), so it can be recorded once
        as a CUDA graph and replayed."""
        cfg, sae, dist = self.cfg, self.sae, self.dist
        if self.unscale != 1.0:
            x = x * self.unscale
        dead = self.since_fired > cfg.dead_tokens if self.k_aux else None
        with self.rt.autocast(cache=not self.graphed):
            out = self.model(x, dead_mask=dead, auxk_k=self.k_aux or None,
                             reduce=dist.sum if dist.enabled else None)
        loss = out.mse + self.lb_weight * out.lb_loss + cfg.auxk_alpha * out.auxk_loss
        bad = ~torch.isfinite(loss.detach())
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.step_t, self.first_bad))
        # Recorded as a CUDA graph, this runs once, at recording: the recorded backward then
        # allocates the gradients (in the graph's memory) and every replay writes them afresh.
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        optimiser_step(sae, self.opt, cfg.grad_clip)

        # TopK may pick zeros when fewer than k candidates are positive: not a firing.
        M = self.sae_cfg.width
        fired = torch.zeros(M, device=self.device).scatter_add_(
            0, out.codes.top_indices.reshape(-1), (out.codes.top_acts > 0).reshape(-1).float()
        )
        dist.sum_(fired)
        self.since_fired.add_(x.shape[0] * dist.world).masked_fill_(fired > 0, 0)
        self.window.add(out, loss)

    def _graphed_step(self, x: torch.Tensor) -> None:
        """The step as a CUDA graph: a few eager steps on a side stream (lazy initialisation:
        Adam's state, cuBLAS workspaces), then the next step is recorded and every later one
        replays it with its batch copied into the recorded input. Recorded again whenever
        AuxK's pick count changes (at a log step) or the batch's shape does. Each of these is a
        real step on its own batch: the order of steps and data is the eager trainer's."""
        if self.static_x is not None and self.static_x.shape != x.shape:  # recorded for another
            self.replay, self.static_x, self.warm = None, None, 0
        if self.replay is None and self.warm < (3 if self.static_x is None else 1):
            self.recorder.eager(lambda: self._device_step(x))
            self.warm += 1
            return
        if self.static_x is None:
            self.static_x = torch.empty_like(x)
        self.static_x.copy_(x)
        if self.replay is None:
            try:
                self.replay = self.recorder.record(lambda: self._device_step(self.static_x))
            except RuntimeError as exc:
                # A failed recording can leave CUDA's stream and allocator state unusable for
                # the rest of this process: stop here (the last checkpoint is kept).
                cause = exc.__context__ if isinstance(exc.__context__, RuntimeError) else exc
                why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
                raise TrainingError(
                    f"The training step could not be recorded as a CUDA graph ({why}); run the "
                    f"same command with --cuda-graph off to resume from step {self.last_good} "
                    f"without one."
                ) from None
            self.recordings += 1
        self.replay()

    def _report(self, done: int, lr: float, log_now: bool, ckpt_now: bool) -> None:
        cfg, run, dist = self.cfg, self.run, self.dist
        bad_at = int(dist.max_(self.first_bad.clone()))  # the host reads the device here, only here
        if bad_at >= 0:
            raise TrainingError(
                f"Training stopped at step {bad_at}: the loss became NaN or infinite; "
                f"the last good checkpoint (step {self.last_good}) is kept in {run.state}."
            )
        dead_now = self.since_fired > cfg.dead_tokens
        k_aux = self._aux_picks(dead_now)
        if k_aux != self.k_aux:
            self.k_aux = k_aux
            self.replay, self.warm = None, 0  # a recorded step has its pick count built in
        if log_now:
            self._sync()
            now = time.perf_counter()
            tps = self.tokens_since / max(now - self.t_last, 1e-9)  # checkpoints included
            self.t_last, self.tokens_since = now, 0
            if dist.enabled:  # every process's window, averaged
                dist.sum_(self.window.sums)  # the step counts add up too
                dist.sum_(self.window.load)
            row = self.window.summary(done, done * cfg.batch_tokens, lr, tps, self.sae,
                                      float(dead_now.float().mean()))
            # The SAE sees x·scale; the log's MSE is in the model's units, like `moesae eval`'s
            # (loss stays the training objective, in the SAE's units).
            row["mse"] /= self.scale**2
            row["mse_unit"] = "model"
            if self.device.type == "cuda":
                row["cuda_graph"] = self.graphed
            if dist.is_main:
                run.append_log(row)
            if self.bar is not None:
                self.bar.set_postfix(tok_s=f"{tps:,.0f}", fvu=f"{row['fvu']:.3f}")
        if ckpt_now:
            if dist.is_main:
                # METHOD §5: duplicates appear only late in training, so track them.
                run.append_log(redundancy_row(self.sae, done, done * cfg.batch_tokens))
                extra = {"since_fired": self.since_fired}
                state = getattr(self.source, "state_dict", None)
                meta = self._meta()
                if state is not None:
                    meta["source_state"] = state()
                run.save_state(self.sae, self.opt, done, extra, meta)
            dist.barrier()
            self.last_good = done

    def finish(self) -> Path:
        self.replay = self.static_x = None  # the recorded step's memory goes back
        if self.bar is not None:
            self.bar.close()
        if not self.done:
            if self.dist.is_main:
                self.run.save_final(self.sae, self._meta(), self.cfg.to_dict(), self.cfg.steps)
            self.dist.barrier()
            self.done = True
        return self.run.path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_source(cfg: TrainConfig, rt: Runtime, dist: Dist, progress: bool,
                stream_dir: Path | None = None) -> BatchSource:
    """The batch source a config asks for: its harvest folder, or the model itself (whose
    contexts and held-out set are kept in `stream_dir`, by default the run folder)."""
    if cfg.batch_tokens % dist.world:
        raise ConfigError(
            f"The global batch of {cfg.batch_tokens} tokens does not split evenly across "
            f"{dist.world} processes; choose --batch-tokens divisible by {dist.world}."
        )
    if cfg.acts:
        from ..data.activation_store import ActivationStore

        return harvest_batches(ActivationStore(cfg.acts), cfg.batch_tokens, cfg.seed, rt.device,
                               cfg.batches, rank=dist.rank, world=dist.world)
    from ..data.stream import stream_source

    return stream_source(cfg, stream_dir or Path(cfg.out), rt.device, dist, progress)


def train_many(cfgs: Sequence[TrainConfig], source: BatchSource | None = None,
               progress: bool = True, stream_dir: Path | None = None) -> list[Path]:
    """Train several SAEs in lockstep on one batch source (they must share seed, batch size
    and data); each keeps its own run folder, checkpoints and resumes on its own."""
    if not cfgs:
        return []
    first = cfgs[0]
    for c in cfgs:
        check_config(c)
        if (c.batch_tokens, c.seed, c.acts) != (first.batch_tokens, first.seed, first.acts):
            raise ConfigError("SAEs trained together must share --batch-tokens, --seed and --acts.")
    dist, device = from_environment(first.runtime.device, first.dist_backend)
    rt = resolve(RuntimeConfig(device=device, precision=first.runtime.precision))
    if source is None:
        source = make_source(first, rt, dist, progress, stream_dir)
    trainers = [Trainer(c, source, resolve(RuntimeConfig(device=device, precision=c.runtime.precision)),
                        dist, progress) for c in cfgs]
    try:
        starts = [t.start() for t in trainers]
        first_step = min(starts)
        last_step = max(c.steps for c in cfgs)
        restore = getattr(source, "load_state_dict", None)
        if restore is not None and first_step > 0:
            states = [t.run.load_source_state() for t, s in zip(trainers, starts, strict=True)
                      if s == first_step]
            if states and states[0] is not None:
                restore(states[0])
        for step in range(first_step, last_step):
            if all(step >= c.steps for c in cfgs):
                break
            x = source.batch(step)
            for t in trainers:
                if step < t.cfg.steps:
                    t.step(step, x)
        return [t.finish() for t in trainers]
    finally:
        for t in trainers:
            t.close()
        close = getattr(source, "close", None)
        if close is not None:
            close()


def train(cfg: TrainConfig, progress: bool = True, source: BatchSource | None = None) -> Path:
    """Train (or resume, or skip when already done) one SAE; returns the run folder."""
    return train_many([cfg], source, progress)[0]
