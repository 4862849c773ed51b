"""Our checkpoint format: one folder, symmetric and boring (as in EleutherAI sparsify).

    cfg.json          SAEConfig fields + "input_scale" + "format": "moesae-sae/1" + metadata
                      (model, hook, d_in, acts, ...)
    sae.safetensors   the state_dict (input_scale buffer included)

Writes go to a sibling temporary folder that replaces the target only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import DataError, UserError
from ..paths import atomic_folder
from ..sae import SAEConfig, SparseAutoencoder, build_sae, registry
from .common import CFG_FILE, json_default, read_json, read_safetensors, sentence

FORMAT = "moesae-sae/1"
WEIGHTS_FILE = "sae.safetensors"


def is_native(folder: Path) -> bool:
    try:
        return read_json(folder / CFG_FILE).get("format") == FORMAT
    except DataError:
        return False


def save_sae(sae: SparseAutoencoder, folder: str | Path, meta: dict | None = None) -> Path:
    """Write `cfg.json` + `sae.safetensors` into `folder` atomically (replacing a checkpoint there)."""
    cfg: dict[str, Any] = dict(meta or {})
    cfg.setdefault("d_in", sae.cfg.d_in)
    # The SAE's own description always wins over metadata with the same key.
    cfg.update(sae.cfg.to_dict())
    cfg["input_scale"] = float(sae.input_scale)
    cfg["format"] = FORMAT
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=json_default))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})

    return atomic_folder(folder, write, may_replace=lambda p: (p / CFG_FILE).exists(), kind="an SAE checkpoint folder")


def load_native(folder: Path) -> tuple[SparseAutoencoder, dict]:
    """(SAE in eval mode on the CPU, the whole cfg.json) of one of our checkpoint folders."""
    cfg_path = folder / CFG_FILE
    cfg = read_json(cfg_path)
    if cfg.get("format") != FORMAT:
        raise DataError(f"{cfg_path} is not a moesae SAE checkpoint (format {cfg.get('format')!r}).")
    if cfg.get("arch") not in registry.all_names():
        raise DataError(f"{cfg_path} names an unknown SAE architecture {cfg.get('arch')!r}.")
    try:
        sae = build_sae(SAEConfig.from_dict(cfg))
    except (UserError, TypeError, ValueError) as exc:
        raise DataError(f"{cfg_path} describes an invalid SAE ({sentence(exc)}).") from None
    load_tensors(sae, read_safetensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    return sae, cfg


def load_tensors(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `tensors` into `sae`, refusing missing, extra, mis-shaped or non-finite ones."""
    expected = sae.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise DataError(f"{path} has no tensor '{name}'.")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise DataError(
                f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(ref.shape)}."
            )
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
            raise DataError(f"{path}: '{name}' contains NaN or infinite values.")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DataError(
            f"{path} has unexpected tensors {', '.join(extra)} for a {sae.cfg.arch} SAE."
        )
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
