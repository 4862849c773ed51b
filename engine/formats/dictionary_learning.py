"""The reference codes' checkpoints: the `dictionary_learning` layout (`ae.pt` — a state dict
saved with torch.save — plus `config.json`) that both reference implementations write:

- the Scale SAE authors' `MultiExpertScaleAutoEncoder` (shahinxu/Scale-Sparse-Autoencoder,
  `dictionary_learning/trainers/scale.py`): per expert `expert_modules.{i}.encoder.weight`
  [m, d], `.encoder.bias` [m] and `.decoder` [m, d]; `gate.weight` [N, d], `gate.bias` [N];
  `b_gate`, `b_dec` [d]; `omega` [N]; `lp_transform_encoder.weight` = T [d, d] (and the unused
  `beta`, `lp_transform_decoder.weight`). Config `trainer`: activation_dim, dict_size, k,
  experts, e, heaviside.
- the Switch SAE reference's `SwitchAutoEncoder` (amudide/switch_sae,
  `dictionary_learning/trainers/switch.py`): `encoder.weight` [M, d] (no bias), `router.weight`
  [N, d] (no bias), `decoder` [M, d], `b_dec`, `b_router` [d]. Config `trainer`:
  activation_dim, dict_size, k, experts, heaviside.

Both read raw activations (no normalisation: input scale 1) and compute every expert densely
before masking; ours compute only the selected experts, which gives the same codes. Their
`heaviside` is our `expert_weighting = binary`. Nothing is unpickled: `torch.load` runs with
`weights_only=True`, and a file holding anything but tensors is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import DataError
from ..sae import SAEConfig, SparseAutoencoder, build_sae
from .common import read_json

WEIGHTS = "ae.pt"
CONFIG = "config.json"
SCALE_CLASSES = ("MoETrainer", "MoEAutoEncoder", "MultiExpertScaleAutoEncoder")
SWITCH_CLASSES = ("SwitchTrainer", "SwitchAutoEncoder")


def _trainer(folder: Path) -> dict:
    cfg = read_json(folder / CONFIG)
    trainer = cfg.get("trainer", cfg)
    if not isinstance(trainer, dict):
        raise DataError(f"{folder / CONFIG} has no 'trainer' object.")
    return trainer


def _kind(trainer: dict) -> str | None:
    names = {str(trainer.get("trainer_class")), str(trainer.get("dict_class"))}
    if names & set(SCALE_CLASSES):
        return "scale"
    if names & set(SWITCH_CLASSES):
        return "switch"
    return None


def is_dictionary_learning(folder: Path) -> bool:
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        return False
    try:
        return _kind(_trainer(folder)) is not None
    except DataError:
        return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors only; DataError (one sentence) for anything else."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path} holds objects other than tensors, so it is not loaded "
            f"(only tensors are read: {str(exc).splitlines()[0][:120]})."
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a readable PyTorch state dict ({exc}).") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"{path} does not hold a state dict of tensors.")
    return sd


def _need(sd: dict, name: str, shape: tuple, path: Path) -> torch.Tensor:
    if name not in sd:
        raise DataError(f"{path} has no tensor '{name}'.")
    if tuple(sd[name].shape) != shape:
        raise DataError(f"{path}: '{name}' has shape {tuple(sd[name].shape)}, expected {shape}.")
    return sd[name].float()


def _model_name(lm_name) -> str | None:
    """A hub name as it is; a local path (their configs hold one) by its last part."""
    if not lm_name:
        return None
    return Path(lm_name).name if str(lm_name).startswith(("/", ".")) else str(lm_name)


def import_dictionary_learning(folder: Path) -> tuple[SparseAutoencoder, dict]:
    """(our Scale or Switch SAE with the same outputs, metadata) of a reference checkpoint."""
    folder = Path(folder)
    trainer = _trainer(folder)
    kind = _kind(trainer)
    if kind is None:
        raise DataError(f"{folder / CONFIG} names neither the Scale nor the Switch SAE's classes.")
    try:
        d, M = int(trainer["activation_dim"]), int(trainer["dict_size"])
        N, k = int(trainer["experts"]), int(trainer["k"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{folder / CONFIG} lacks integer activation_dim, dict_size, experts and k."
        ) from None
    e = int(trainer.get("e", 1)) if kind == "scale" else 1
    weighting = "binary" if trainer.get("heaviside") else "softmax"
    path = folder / WEIGHTS
    sd = read_state_dict(path)
    m = M // N
    cfg = SAEConfig(arch=kind, d_in=d, width=M, experts=N, active=e, k=k,
                    feature_scaling=kind == "scale", expert_weighting=weighting,
                    scaling_form="t_mean")
    try:
        sae = build_sae(cfg)
    except Exception as exc:  # an impossible configuration in their config.json
        raise DataError(f"{folder / CONFIG} describes an SAE this tool cannot build ({exc}).") from None
    with torch.no_grad():
        if kind == "scale":
            enc = torch.cat([_need(sd, f"expert_modules.{i}.encoder.weight", (m, d), path) for i in range(N)])
            bias = torch.cat([_need(sd, f"expert_modules.{i}.encoder.bias", (m,), path) for i in range(N)])
            dec = torch.cat([_need(sd, f"expert_modules.{i}.decoder", (m, d), path) for i in range(N)])
            sae.W_g.copy_(_need(sd, "gate.weight", (N, d), path))
            sae.b_g.copy_(_need(sd, "gate.bias", (N,), path))
            sae.b_gate.copy_(_need(sd, "b_gate", (d,), path))
            sae.T.copy_(_need(sd, "lp_transform_encoder.weight", (d, d), path))
            sae.omega.copy_(_need(sd, "omega", (N,), path))
        else:
            enc = _need(sd, "encoder.weight", (M, d), path)
            bias = torch.zeros(M)  # their encoder has no bias
            dec = _need(sd, "decoder", (M, d), path)
            sae.W_r.copy_(_need(sd, "router.weight", (N, d), path))
            sae.b_router.copy_(_need(sd, "b_router", (d,), path))
        sae.W_enc.copy_(enc)
        sae.b_enc.copy_(bias)
        sae.W_dec.copy_(dec)  # as saved: their rows need not be unit-norm
        sae.b_dec.copy_(_need(sd, "b_dec", (d,), path))
        sae.input_scale.fill_(1.0)  # they read raw activations
    for name, t in sae.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(f"{path}: '{name}' contains NaN or infinite values.")
    sae.eval()
    layer = trainer.get("layer")
    meta = {
        "model": _model_name(trainer.get("lm_name")),
        "hook": f"blocks.{int(layer)}.hook_resid_post" if isinstance(layer, int) else None,
        "d_in": d,
        "source": {"format": "dictionary_learning", "path": str(folder.resolve()),
                   "class": trainer.get("dict_class") or trainer.get("trainer_class"),
                   "submodule": trainer.get("submodule_name")},
    }
    return sae, meta
