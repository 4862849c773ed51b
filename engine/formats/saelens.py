"""SAELens checkpoints: import (`standard`, `topk`, `jumprelu`) and export (dense TopK).

SAELens format: `cfg.json` + `sae_weights.safetensors`, W_enc stored as [d_in, d_sae]. SAELens
SAEs read raw activations, so our input scale s is folded into the weights on export, using
ReLU/TopK's positive homogeneity:
    z/s = TopK(ReLU(W_enc (x − b_dec/s) + b_enc/s)),   x̂_raw = W_decᵀ (z/s) + b_dec/s
i.e. W_enc and W_dec are kept (decoder rows stay unit-norm), b_enc, b_dec (and θ) are divided
by s, and the exported feature activations are ours divided by s (raw units).
"""

from __future__ import annotations

import json
import math
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, DataError, UserError
from ..paths import atomic_folder
from ..sae import SAEConfig, SparseAutoencoder, build_sae
from .common import CFG_FILE, read_json, read_safetensors, sentence

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
EXPORTABLE = ("topk", "standard", "jumprelu")
"""Architectures SAELens can represent (routed experts it cannot)."""


def is_saelens(folder: Path) -> bool:
    if not (folder / SAELENS_WEIGHTS_FILE).is_file():
        return False
    try:
        return "format" not in read_json(folder / CFG_FILE)
    except DataError:
        return False


def import_saelens(folder: str | Path) -> tuple[SparseAutoencoder, dict]:
    """Read a SAELens-saved SAE (`cfg.json` + `sae_weights.safetensors`) → (SAE, metadata).

    `topk` becomes our TopKSAE; `standard` and `jumprelu` become the inference-only ImportedSAE.
    `apply_b_dec_to_input = False` and `rescale_acts_by_decoder_norm` are folded into the
    weights so the result reconstructs exactly what SAELens does, from raw activations.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"No SAELens SAE folder at {folder}.")
    cfg_path = folder / CFG_FILE
    cfg = read_json(cfg_path)
    arch = cfg.get("architecture")
    if arch is None:  # SAELens < 6 configs
        kwargs = cfg.get("activation_fn_kwargs") or {}
        arch = "topk" if cfg.get("activation_fn") == "topk" and "k" in kwargs else "standard"
        if arch == "topk":
            cfg["k"] = kwargs["k"]
    if arch not in ("standard", "topk", "jumprelu"):
        raise ConfigError(
            f"SAELens architecture '{arch}' in {cfg_path} is not supported; "
            "use standard, topk or jumprelu."
        )
    norm = cfg.get("normalize_activations") or "none"
    # SAELens' inference SAE treats "expected_average_only_in" as the identity (the factor is
    # folded in by the loader when known), so it reads raw activations like "none".
    if norm not in ("none", "expected_average_only_in"):
        raise ConfigError(
            f"SAELens SAEs with normalize_activations='{norm}' are not supported; "
            "fold the normalisation into the weights first."
        )
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{cfg_path} lacks integer d_in and d_sae entries.") from None

    weights_path = folder / SAELENS_WEIGHTS_FILE
    t = read_safetensors(weights_path)
    if "threshold" not in t and "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if name not in t:
            raise DataError(f"{weights_path} has no tensor '{name}'.")
        if tuple(t[name].shape) != shape:
            raise DataError(
                f"{weights_path}: '{name}' has shape {tuple(t[name].shape)}, expected {shape}."
            )
    W_enc = t["W_enc"].double().T.contiguous()  # → [M, d], our layout
    W_dec = t["W_dec"].double()
    b_enc, b_dec = t["b_enc"].double(), t["b_dec"].double()
    threshold = (
        t["threshold"].double() if arch == "jumprelu" else torch.zeros(d_sae, dtype=torch.float64)
    )
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens: pre = W_enc x + b_enc. Ours: pre = W_enc (x − b_dec) + b_enc'.
        b_enc = b_enc + W_enc @ b_dec
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre·‖W_dec row‖ and decodes (z/‖row‖) W_dec: fold the norms in.
        n = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n.clamp_min(1e-12)[:, None]

    if arch == "topk":
        k = int(cfg.get("k", 100))
        try:
            sae: SparseAutoencoder = build_sae(
                SAEConfig(arch="topk", d_in=d_in, width=d_sae, experts=1, active=1, k=k)
            )
        except UserError as exc:
            raise DataError(
                f"{cfg_path} describes an invalid TopK SAE ({sentence(exc)})."
            ) from None
    else:
        sae = build_sae(SAEConfig(arch=arch, d_in=d_in, width=d_sae, experts=1, active=1, k=d_sae))
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch != "topk":
        state["threshold"] = threshold
    with torch.no_grad():
        for name, val in state.items():
            getattr(sae, name).copy_(val.float())
        sae.input_scale.fill_(1.0)
    sae.eval()

    md = cfg.get("metadata") or {}
    meta = {
        "model": md.get("model_name") or cfg.get("model_name"),
        "hook": md.get("hook_name") or cfg.get("hook_name"),
        "d_in": d_in,
        "source": {
            "format": "saelens",
            "path": str(folder.resolve()),
            "architecture": arch,
            "sae_lens_version": md.get("sae_lens_version") or cfg.get("sae_lens_version"),
            "normalize_activations": norm,
        },
    }
    return sae, meta


def export_saelens(sae: SparseAutoencoder, folder: str | Path, meta: dict | None = None) -> Path:
    """Write a dense TopK (or an imported standard/JumpReLU) SAE in SAELens' format, atomically.

    The input scale is folded into the biases (see the module docstring), so the SAELens SAE
    reads raw activations and reconstructs exactly what `sae.reconstruct_raw` does.
    """
    arch = sae.cfg.arch
    if arch not in EXPORTABLE:
        raise ConfigError(
            f"Only dense TopK SAEs can be exported to SAELens; a {arch} SAE has routed experts "
            "that SAELens cannot represent."
        )
    s = float(sae.input_scale)
    if not (s > 0 and math.isfinite(s)):
        raise DataError(
            f"The SAE's input scale {s} is not a positive number, so it cannot be exported."
        )
    with torch.no_grad():
        W_enc = sae.encoder_weight().detach().double().cpu()
        tensors = {
            "W_enc": W_enc.T.contiguous(),  # SAELens: [d_in, d_sae]
            "W_dec": sae.W_dec.detach().double().cpu().contiguous(),
            "b_enc": sae.b_enc.detach().double().cpu() / s,
            "b_dec": sae.b_dec.detach().double().cpu() / s,
        }
        if arch == "jumprelu":
            tensors["threshold"] = sae.threshold.detach().double().cpu() / s
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    md = {"sae_lens_version": _saelens_version(), "sae_lens_training_version": _saelens_version()}
    if meta:
        if meta.get("model"):
            md["model_name"] = meta["model"]
        if meta.get("hook"):
            md["hook_name"] = meta["hook"]
    cfg: dict[str, Any] = {
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": md,
        "architecture": arch,
    }
    if arch == "topk":
        # Our decoder rows are used as they are; SAELens must not rescale by their norms.
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg))

    folder = Path(folder)
    return atomic_folder(folder, write, may_replace=lambda p: (p / SAELENS_WEIGHTS_FILE).exists(), kind="an SAE checkpoint folder")


def _saelens_version() -> str:
    try:
        return _pkg_metadata.version("sae-lens")
    except _pkg_metadata.PackageNotFoundError:
        return "6.0.0"
