"""One training run's configuration (METHOD.md §3 recipe). The `moesae train` flags and the
per-SAE keys of a build file are generated from it (engine.options)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.batches import SOURCES
from ..data.harvest import SourceConfig
from ..options import to_flat
from ..runtime import RuntimeConfig
from ..sae.config import SAEConfig

CUDA_GRAPH = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """One training run. Defaults are the recommended values (METHOD.md §3)."""

    acts: str = ""
    """Activation folder written by `moesae harvest`; without it, activations are computed from the model while training (--model, --corpus, --tokens …)."""
    out: str = ""
    """Run folder (created; an interrupted run in it is resumed)."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The architecture (its fields are flags of their own: --arch, --width, …)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """Without --acts: the model, hook, corpus and token count to stream from."""
    buffer_tokens: int | None = None
    """Without --acts: tokens held in the mixing buffer on the device (default: 2^21 on a GPU, 2^17 on the CPU)."""
    refill_fraction: float = 0.5
    """Without --acts: the share of the buffer that is new at each refill (1/2: every batch mixes three stretches of the stream)."""
    heldout_tokens: int = 100_000
    """Without --acts: held-out tokens harvested into the run folder for eval and analysis."""
    steps: int = 2000
    """Optimiser steps."""
    batch_tokens: int = 4096
    """Tokens per step."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(M / 2^14)."""
    lb_weight: float | None = None
    """α for the load-balancing loss; default 0.01·d (METHOD §2, inputs with E‖x‖² = d)."""
    lb_weight_raw: float | None = None
    """α in the authors' convention, where the MSE is in the model's raw units (their code: 3·d); converted to ours as α = s²·α_raw, s the input scale. Overrides --lb-weight."""
    normalise: bool = True
    """Scale inputs so that E‖x‖² = d (METHOD §3); --no-normalise trains on raw activations, as the authors' code does."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead features (Gao et al. 2024); 0 turns it off."""
    dead_tokens: int = 500_000
    """A feature that has not fired for this many training tokens counts as dead (for AuxK)."""
    decay_fraction: float = 0.2
    """Linear decay of the lr to 0 over this final fraction of steps."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    checkpoint_every: int = 250
    """Steps between resumable checkpoints."""
    log_every: int = 25
    """Steps between log lines (statistics are read from the device only then)."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision (--device, --precision)."""
    batches: str = field(default="auto", metadata={"choices": SOURCES})
    """Where the training split is served from: auto, resident (on the device), pinned (host memory, prefetched), chunked (sequential reads, for harvests larger than memory) or memmap."""
    dist_backend: str | None = None
    """Under torchrun: gloo or nccl (default: nccl on CUDA, gloo on the CPU)."""
    kernels: str = field(default="fast", metadata={"choices": ("fast", "reference")})
    """fast (sparse backward; grouped GEMM where it needs no host sync) or reference (plain autograd: the test oracle)."""
    cuda_graph: str = field(default="auto", metadata={"choices": CUDA_GRAPH})
    """Record the training step once as a CUDA graph and replay it each step (no per-kernel launch cost on the host): auto (where the step never waits for the device — CUDA, one process, the fast kernels, and for Switch and Scale bf16 on Hopper or Blackwell), on, or off."""

    def identity(self) -> dict:
        """The options that define what is trained (not where, how often it logs or on what
        device), flat: the run folder's name in a build is a hash of this."""
        d = to_flat(self)
        for key in ("out", "checkpoint_every", "log_every", "device", "batches", "kernels", "cuda_graph",
                    "batch_contexts", "dist_backend", "model_forward"):
            d.pop(key)
        if self.acts:  # a harvest: the stream's options do not apply
            for key in ("model", "hook", "corpus", "tokens", "context_len", "eval_fraction",
                        "drop_outliers", "model_dtype", "buffer_tokens", "refill_fraction",
                        "heldout_tokens"):
                d.pop(key)
            d["acts"] = str(Path(self.acts).resolve())
        return d

    def to_dict(self) -> dict:
        return asdict(self)
