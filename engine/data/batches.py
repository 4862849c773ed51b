"""Where the trainer's batches come from.

The trainer asks a `BatchSource` for the batch of a step; it never reads files itself, so a
streaming buffer or a distributed sampler plugs in here. Batches are a pure function of
(seed, step), so a run killed with `kill -9` and started again sees exactly the data it
would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import DataError, TrainingError
from .activation_store import ActivationStore


class BatchSource(Protocol):
    d_in: int
    """Width of the activations."""
    norm_scale: float
    """x_norm = norm_scale · x_raw gives E‖x_norm‖² = d on the training data."""
    n_tokens: int
    """Training tokens available."""

    def describe(self) -> dict:
        """What a checkpoint records about the data: model, hook, acts."""

    def batch(self, step: int) -> torch.Tensor:
        """[batch_tokens, d] normalised activations for `step`, on the training device."""


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Token indices for `step`: consecutive slices of a seeded permutation per epoch."""
    per_epoch = max(1, n // batch)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[offset * batch : (offset + 1) * batch])


class HarvestBatches:
    """Batches drawn from the training split of a harvest folder (memory-mapped shards)."""

    def __init__(self, store: ActivationStore, batch_tokens: int, seed: int, device: torch.device):
        self.store = store
        self.data = store.split("train")
        self.batch_tokens, self.seed, self.device = batch_tokens, seed, device
        self.d_in = store.d_in
        self.norm_scale = store.norm_scale
        self.n_tokens = self.data.n_tokens
        if self.n_tokens < batch_tokens:
            raise DataError(
                f"The training split of {store.path} has {self.n_tokens} tokens, fewer than "
                f"one batch of {batch_tokens}; harvest more tokens or lower --batch-tokens."
            )

    def describe(self) -> dict:
        return {"model": self.store.model_name, "hook": self.store.hook,
                "acts": str(Path(self.store.path).resolve())}

    def batch(self, step: int) -> torch.Tensor:
        idx = batch_indices(self.n_tokens, self.batch_tokens, step, self.seed)
        x = torch.from_numpy(np.asarray(self.data.read(idx), dtype=np.float32))
        x = x.to(self.device) * self.norm_scale
        if not torch.isfinite(x).all():
            raise TrainingError(
                f"Activations of the batch for step {step} contain NaN or inf; "
                f"re-harvest {self.store.path}."
            )
        return x
