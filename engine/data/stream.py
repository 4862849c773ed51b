"""Training straight from the model: activations computed on the fly into a mixing buffer on
the training device, so the number of training tokens is not bounded by the disk.

The training contexts of an epoch are visited in a seeded order and cut into *segments* of
consecutive contexts. The model computes a segment's activations (the first position and
outliers dropped, as in a harvest; the outlier threshold is 10× the segment's median norm);
they are shuffled and cut into `p` parts. Phase r serves part 0 of segment r, part 1 of
segment r−1, …, part p−1 of segment r−p+1, shuffled together, as consecutive batches. So every
token is served exactly once per epoch, each batch mixes p segments, and the buffer holds
(p+1)/2 segments: `refill_fraction` = 2/(p+1) of it is new at every phase (1/2 → p = 3).

What a phase serves depends only on the seed and the p segments it reads, so the source's
state is just (phase, offset): a resumed run recomputes those p segments and serves exactly
the batches an uninterrupted run would have — bit for bit where the model's forward pass is
deterministic (the CPU; a GPU with the same kernels), which `tests/` checks on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .harvest import OUTLIER_FACTOR


@dataclass
class StreamState:
    phase: int
    """The phase the next batch starts in."""
    offset: int
    """Tokens of that phase already served."""


class StreamBatches:
    """A `BatchSource` that runs the model: batches of `batch_tokens` normalised activations."""

    def __init__(self, lm, hook: str, contexts: np.ndarray, batch_tokens: int, seed: int,
                 device: torch.device, buffer_tokens: int, refill_fraction: float,
                 batch_contexts: int, drop_outliers: bool, norm_scale: float | None,
                 describe: dict, rank: int = 0, world: int = 1):
        if not 0 < refill_fraction <= 1:
            raise ConfigError("--refill-fraction must be in (0, 1].")
        self.lm, self.hook, self.contexts = lm, hook, contexts
        self.batch_tokens, self.seed, self.device = batch_tokens, seed, device
        self.batch_contexts, self.drop_outliers = batch_contexts, drop_outliers
        self._describe = describe
        self.rank, self.world = rank, world
        self.d_in = lm.d_model
        self.first_pos = 1 if lm.bos_token_id is not None else 0
        self.body = contexts.shape[1] - self.first_pos
        self.p = max(1, round(2 / refill_fraction - 1))
        seg_tokens = 2 * buffer_tokens / (self.p + 1)  # the buffer holds (p+1)/2 segments
        self.seg_contexts = max(1, math.ceil(max(seg_tokens, batch_tokens) / self.body))
        self.n_contexts = len(contexts)
        # each process streams every world-th segment of the epoch, from its own rank on
        self.seg_per_epoch = max(1, math.ceil(self.n_contexts / self.seg_contexts) // world)
        self.n_tokens = self.n_contexts * self.body  # before outliers are dropped
        if self.n_tokens < batch_tokens:
            raise DataError(
                f"The training contexts hold {self.n_tokens} tokens, fewer than one batch of "
                f"{batch_tokens}; ask for more --tokens or lower --batch-tokens."
            )
        self._segments: dict[int, list[torch.Tensor]] = {}
        self._phase_rows: torch.Tensor | None = None
        self.state = StreamState(0, 0)
        self._last: tuple[int, torch.Tensor] | None = None
        self._next_step = 0
        # x_norm = norm_scale · x_raw with E‖x_norm‖² = d over the first segment
        first = torch.cat(self._segment(0)).float()
        self.first_stats = (float(first.pow(2).sum()), len(first))
        """Σ‖x‖² and the token count of this process's first segment (processes combine them)."""
        self.norm_scale = norm_scale or math.sqrt(self.d_in * len(first) / self.first_stats[0])

    def describe(self) -> dict:
        return dict(self._describe)

    # -- segments -------------------------------------------------------------------------
    def _segment_contexts(self, g: int) -> np.ndarray:
        """Contexts of this process's g-th segment: segment j·world + rank of the epoch's order."""
        epoch, j = divmod(g, self.seg_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_contexts)
        j = j * self.world + self.rank
        return order[j * self.seg_contexts : (j + 1) * self.seg_contexts]

    @torch.no_grad()
    def _compute_segment(self, g: int) -> list[torch.Tensor]:
        """Segment g's activations (float16, on the device), shuffled, in p parts."""
        ids = np.sort(self._segment_contexts(g))
        parts = []
        for s in range(0, len(ids), self.batch_contexts):
            tok = torch.from_numpy(self.contexts[ids[s : s + self.batch_contexts]].astype(np.int64))
            x = self.lm.activations(tok, self.hook)[:, self.first_pos :, :].reshape(-1, self.d_in)
            parts.append(x.to(self.device, torch.float16))
        x = torch.cat(parts)
        norms = x.float().norm(dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise DataError(f"Model {self.lm.name} produced NaN or infinite activations at {self.hook}.")
        if self.drop_outliers:
            x = x[norms <= OUTLIER_FACTOR * norms.median()]
        order = np.random.default_rng([self.seed, 1, g, self.rank]).permutation(len(x))
        x = x[torch.from_numpy(order).to(x.device)]
        return list(torch.tensor_split(x, self.p))

    def _segment(self, g: int) -> list[torch.Tensor]:
        if g not in self._segments:
            self._segments[g] = self._compute_segment(g)
        return self._segments[g]

    def _build_phase(self, r: int) -> torch.Tensor:
        rows = [self._segment(r - i)[i] for i in range(self.p) if r - i >= 0]
        for g in [g for g in self._segments if g <= r - self.p + 1 - 1]:
            del self._segments[g]  # fully served
        x = torch.cat(rows)
        order = np.random.default_rng([self.seed, 2, r, self.rank]).permutation(len(x))
        return x[torch.from_numpy(order).to(x.device)]

    # -- batches --------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        """The batch of `step`; steps are served in order (the trainer's init reads step 0,
        then trains from it, so the last batch is kept)."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if step != self._next_step:
            raise RuntimeError(f"a stream serves steps in order: asked for {step}, next is {self._next_step}")
        out, need = [], self.batch_tokens
        while need:
            if self._phase_rows is None:
                self._phase_rows = self._build_phase(self.state.phase)
            rows = self._phase_rows[self.state.offset : self.state.offset + need]
            out.append(rows)
            need -= len(rows)
            self.state.offset += len(rows)
            if self.state.offset >= len(self._phase_rows):
                self.state = StreamState(self.state.phase + 1, 0)
                self._phase_rows = None
        x = torch.cat(out).float() * self.norm_scale
        self._last = (step, x)
        self._next_step = step + 1
        return x

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts (saved with each checkpoint)."""
        return {"phase": self.state.phase, "offset": self.state.offset, "next_step": self._next_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(int(state["phase"]), int(state["offset"]))
        self._next_step = int(state["next_step"])
        self._segments.clear()
        self._phase_rows = None
        self._last = None


def stream_source(cfg, run: Path, device: torch.device, dist, progress: bool) -> StreamBatches:
    # `run`: the folder that keeps the stream's contexts and held-out set (a run folder, or a
    # build's shared streams/<hash>)
    """The stream of a `moesae train` without --acts: the model, its contexts (cut from the
    corpus once and kept in the run folder, so a resume reads the same ones), a small held-out
    harvest in `<run>/heldout` (what eval and analyze read), and the normalisation scalar from
    the first segment. With several processes each streams its own share of the segments."""
    from ..models import load_model
    from .activation_store import ActivationStore
    from .harvest import (
        ContextFeed,
        check_source,
        default_batch_contexts,
        save_contexts,
        split_contexts,
        write_shards,
    )

    src = cfg.source
    check_source(src)
    lm = load_model(src.model_name, device=str(device), dtype=src.model_dtype)
    lm.forward = src.model_forward
    hook = lm.resolve_hook(src.hook)
    folder = run / "stream"
    if dist.is_main and not (folder / "contexts.npy").exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_contexts(folder, *split_contexts(src, lm))
    dist.barrier()
    tokens = np.load(folder / "contexts.npy")
    meta = json.loads((folder / "contexts.json").read_text())
    split = np.asarray(meta["split"])
    train_ctx = tokens[split == "train"]
    first_pos = 1 if lm.bos_token_id is not None else 0
    buffer = cfg.buffer_tokens or (1 << 21 if device.type == "cuda" else 1 << 17)
    need = buffer * lm.d_model * 2 * 3 // 2  # float16, plus the segment being computed
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"the {free / 2**30:.1f} GiB free on {device}"
    else:
        from .batches import _available_host_bytes

        free = _available_host_bytes() or need
        where = f"the {free / 2**30:.1f} GiB of memory available"
    if need > free:
        raise ConfigError(
            f"A buffer of {buffer:,} tokens ({need / 2**30:.1f} GiB) does not fit in {where}; "
            "lower --buffer-tokens."
        )
    source = StreamBatches(
        lm, hook, train_ctx, cfg.batch_tokens // dist.world, cfg.seed, device, buffer,
        cfg.refill_fraction, src.batch_contexts or default_batch_contexts(device),
        src.drop_outliers, norm_scale=None, describe={}, rank=dist.rank, world=dist.world,
    )
    if dist.enabled:  # one scale for every process
        stats = torch.tensor(source.first_stats, dtype=torch.float64, device=device)
        dist.sum_(stats)
        source.norm_scale = math.sqrt(source.d_in * float(stats[1]) / float(stats[0]))
    # a small held-out set, stored like a harvest: what `moesae eval` and `analyze` read
    held = run / "heldout"
    eval_ids = np.nonzero(split == "eval")[0]
    body = tokens.shape[1] - first_pos
    eval_ids = eval_ids[: max(1, -(-cfg.heldout_tokens // body))]
    if dist.is_main and not (held / "manifest.json").exists():
        held.mkdir(parents=True, exist_ok=True)
        contexts = ContextFeed.of(tokens[eval_ids], [meta["domains"][i] for i in eval_ids],
                                  ["eval"] * len(eval_ids))
        save_contexts(held, contexts.tokens, contexts.domains, contexts.split)
        identity = {"heldout_of": str(run.resolve()), "model": lm.name, "hook": hook}
        write_shards(lm, hook, held, identity, contexts,
                     batch_contexts=src.batch_contexts, drop_outliers=src.drop_outliers,
                     progress=progress, norm_scale=source.norm_scale)
    dist.barrier()
    ActivationStore(held)  # fails with one sentence if it is not complete
    source._describe = {"model": lm.name, "hook": hook, "acts": str(held.resolve()),
                        "stream": {"tokens": int(len(train_ctx) * body), "contexts": str(folder)}}
    return source
