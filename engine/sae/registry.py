"""The one list of SAE architectures, with what each can do.

Adding an architecture is one new module that ends with a `register(...)` call, plus one
import line in `engine/sae/__init__.py`; checkpoints, analysis and the command line all read
this registry, so nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import SparseAutoencoder


@dataclass(frozen=True)
class Architecture:
    name: str
    """The name in configs, checkpoints and on the command line (`--arch`)."""
    cls: type[SparseAutoencoder]
    """The class that implements it."""
    trainable: bool
    """Whether `moesae train` can train it (imported SAELens SAEs are inference-only)."""
    topk_codes: bool
    """Whether every token has at most k non-zero codes (what the analysis pass reads)."""
    routed: bool
    """Whether it has a router and experts (N > 1 possible)."""
    max_active: int | None
    """Experts a token may use: 1 for Switch, None (= up to N) for Scale; None if not routed."""
    summary: str
    """One line for `--help` and the README."""


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    """The architecture called `name`; ConfigError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"Unknown architecture '{name}'; choose one of {', '.join(trainable())}."
        ) from None


def all_names() -> list[str]:
    return list(_REGISTRY)


def trainable() -> list[str]:
    """Names of the architectures `moesae train` accepts, in registration order."""
    return [a.name for a in _REGISTRY.values() if a.trainable]
