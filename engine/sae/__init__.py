"""SAE architectures behind one interface, looked up by name in `registry`.

Adding an architecture is one new module ending in a `register(...)` call plus one import
line below.
"""

from __future__ import annotations

from . import registry

# Each module registers its architecture; this order is the order they are listed in.
# isort: off
from . import topk, switch, scale, imported  # noqa: F401
# isort: on
from .base import EncoderOutput, ForwardOutput, SparseAutoencoder
from .config import SAEConfig


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of the configured architecture."""
    return registry.get(cfg.arch).cls(cfg)


__all__ = [
    "EncoderOutput",
    "ForwardOutput",
    "SAEConfig",
    "SparseAutoencoder",
    "build_sae",
    "registry",
]
