"""SAE architectures behind one interface, looked up by name.

Adding an architecture is one new module plus one line in REGISTRY.
"""

from __future__ import annotations

from .base import ConfigError, EncoderOutput, ForwardOutput, SAEConfig, SparseAutoencoder
from .scale import ScaleSAE
from .switch import SwitchSAE
from .topk import TopKSAE

REGISTRY: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "switch": SwitchSAE,
    "scale": ScaleSAE,
}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of the configured architecture."""
    cfg.validate()
    return REGISTRY[cfg.arch](cfg)


__all__ = [
    "REGISTRY",
    "ConfigError",
    "EncoderOutput",
    "ForwardOutput",
    "SAEConfig",
    "SparseAutoencoder",
    "build_sae",
]
