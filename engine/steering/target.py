"""Which SAE of a build to steer, where its checkpoint is, and loading it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError, DataError
from ..training.run_folder import RunFolder

if TYPE_CHECKING:
    from ..sae import SparseAutoencoder
    from ..store import SAEInfo, Store


@dataclass
class SteerTarget:
    """What a build says about one SAE, enough to load it and its model for steering."""

    sae: str
    model: str
    hook: str
    checkpoint: str
    width: int
    experts: int


def sae_target(store: Store, name: str) -> SteerTarget:
    """The steering target of SAE `name` in a build; ConfigError listing the names if unknown."""
    info = store.sae_info(name)
    if info is None:
        names = [s["sae"] for s in store.list_saes()]
        raise ConfigError(
            f"Unknown SAE '{name}' in {store.path.name}; available: {', '.join(names) or 'none'}."
        )
    return target_from_info(info)


def target_from_info(info: SAEInfo) -> SteerTarget:
    """Where the build says the SAE's checkpoint is (`config.checkpoint`, else `run`/final)."""
    cfg = info.config or {}
    ckpt = cfg.get("checkpoint") or (str(RunFolder(cfg["run"]).final) if cfg.get("run") else None)
    if not ckpt:
        raise DataError(
            f"The build does not record where SAE '{info.name}' is saved, so it cannot be steered."
        )
    return SteerTarget(
        sae=info.name, model=info.model, hook=info.hook, checkpoint=str(ckpt),
        width=int(info.width), experts=int(info.experts or 1),
    )


def pick_sae(store: Store, name: str | None) -> tuple[SteerTarget, str | None]:
    """The named SAE, or — when no name is given — the build's only MoE SAE (or its only SAE).
    Returns the target and a note saying which was picked (None when it was named)."""
    if name:
        return sae_target(store, name), None
    saes = store.list_saes()
    moe = [s for s in saes if (s.get("experts") or 1) > 1]
    pool = moe if len(moe) == 1 else (saes if len(saes) == 1 else None)
    if pool is None:
        names = ", ".join(s["sae"] for s in (moe or saes)) or "none"
        raise ConfigError(f"{store.path.name} holds several SAEs; choose one with --sae ({names}).")
    chosen = pool[0]["sae"]
    kind = "MoE SAE" if pool is moe else "SAE"
    return sae_target(store, chosen), f"using SAE '{chosen}' (the only {kind} in {store.path.name})"


def load_target_sae(target: SteerTarget) -> SparseAutoencoder:
    from ..formats import load_sae

    sae, _ = load_sae(target.checkpoint)
    return sae
