"""What the analysis keeps for one SAE while it streams over the tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stats import FeatureStats, RoutingStats


@dataclass
class SAEPass:
    name: str
    """Build-local name of the SAE."""
    sae: object
    """The SparseAutoencoder (eval mode)."""
    meta: dict
    """Its checkpoint's cfg.json (model, hook, run, checkpoint …)."""
    stats: FeatureStats
    routing: RoutingStats | None
    """Expert load and per-token routing (MoE SAEs only)."""
    spill_v: np.ndarray
    """[n_tokens, k] the codes' values, spilled to a temporary memory-mapped file."""
    spill_i: np.ndarray
    """[n_tokens, k] the codes' feature indices, likewise."""
    encode_seconds: float = 0.0
    stats_seconds: float = 0.0

    @classmethod
    def open(cls, name: str, sae, meta: dict, spill: Path, n_tokens: int, n_domains: int,
             n_vocab: int, top_k: int, hist_bins: int) -> SAEPass:
        cfg = sae.cfg
        spill_v = np.lib.format.open_memmap(spill.with_name(spill.name + "-v.npy"), "w+", np.float32, (n_tokens, cfg.k))
        spill_i = np.lib.format.open_memmap(spill.with_name(spill.name + "-i.npy"), "w+", np.int32, (n_tokens, cfg.k))
        routing = (RoutingStats(cfg.experts, cfg.active, n_domains, n_vocab, n_tokens)
                   if cfg.experts > 1 else None)
        return cls(name, sae, meta, FeatureStats(cfg.width, n_domains, top_k, hist_bins), routing,
                   spill_v, spill_i)

    def close(self) -> None:
        """Drop the memory maps (before their folder is deleted)."""
        self.spill_v = self.spill_i = None
