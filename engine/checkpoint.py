"""SAE checkpoints on disk: our format, and SAELens import/export.

Our format is one folder, symmetric and boring (as in EleutherAI sparsify):

    cfg.json          SAEConfig fields + "input_scale" + "format": "moesae-sae/1" + metadata
                      (model, hook, d_in, acts, ...)
    sae.safetensors   the state_dict (input_scale buffer included)

Nothing is ever pickled: tensors go through safetensors, the rest through JSON. Writes go to a
sibling temporary folder that replaces the target only when complete.

SAELens format (`cfg.json` + `sae_weights.safetensors`, W_enc stored as [d_in, d_sae]) is read
for the `standard`, `topk` and `jumprelu` architectures and written for dense TopK (and for
SAEs imported from SAELens). SAELens SAEs read raw activations, so our input scale s is folded
into the weights on export, using ReLU/TopK's positive homogeneity:
    z/s = TopK(ReLU(W_enc (x − b_dec/s) + b_enc/s)),   x̂_raw = W_decᵀ (z/s) + b_dec/s
i.e. W_enc and W_dec are kept (decoder rows stay unit-norm), b_enc, b_dec (and θ) are divided
by s, and the exported feature activations are ours divided by s (raw units).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, DataError, ModelError, UserError
from .sae import REGISTRY, SAEConfig, SparseAutoencoder, build_sae
from .sae.imported import IMPORTED_ARCHS, ImportedSAE

FORMAT = "moesae-sae/1"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"

# Architecture name → class, for reading checkpoints back (trainable ones + imported ones).
CLASSES: dict[str, type[SparseAutoencoder]] = {
    **REGISTRY,
    **{arch: ImportedSAE for arch in IMPORTED_ARCHS},
}


# -- our format --------------------------------------------------------------------------------
def save_sae(sae: SparseAutoencoder, folder: str | Path, meta: dict | None = None) -> Path:
    """Write `cfg.json` + `sae.safetensors` into `folder` atomically (replacing a checkpoint there)."""
    folder = Path(folder)
    cfg: dict[str, Any] = dict(meta or {})
    cfg.setdefault("d_in", sae.cfg.d_in)
    # The SAE's own description always wins over metadata with the same key.
    cfg.update(sae.cfg.to_dict())
    cfg["input_scale"] = float(sae.input_scale)
    cfg["format"] = FORMAT
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=_json_default))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})

    _atomic_folder(folder, write, is_ours=lambda p: (p / CFG_FILE).exists())
    return folder


def load_sae(
    folder: str | Path, device: str | torch.device | None = None
) -> tuple[SparseAutoencoder, dict]:
    """Read a checkpoint folder (ours, or a SAELens one) → (SAE in eval mode, metadata dict).

    The metadata is the whole cfg.json (model, hook, d_in, acts, arch, ...). Every problem with
    the files raises DataError naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"No SAE checkpoint folder at {folder}.")
    cfg_path = folder / CFG_FILE
    cfg = _read_json(cfg_path)
    if "format" not in cfg and (folder / SAELENS_WEIGHTS_FILE).exists():
        sae, meta = import_saelens(folder)
        return sae.to(device) if device is not None else sae, meta
    if cfg.get("format") != FORMAT:
        raise DataError(
            f"{cfg_path} is not a moesae SAE checkpoint (format {cfg.get('format')!r})."
        )
    arch = cfg.get("arch")
    if arch not in CLASSES:
        raise DataError(f"{cfg_path} names an unknown SAE architecture {arch!r}.")
    try:
        sae_cfg = SAEConfig.from_dict(cfg)
        sae = build_sae(sae_cfg) if arch in REGISTRY else CLASSES[arch](sae_cfg)
    except (UserError, TypeError, ValueError) as exc:
        raise DataError(f"{cfg_path} describes an invalid SAE ({_sentence(exc)}).") from None
    tensors = _read_safetensors(folder / WEIGHTS_FILE)
    _load_tensors(sae, tensors, folder / WEIGHTS_FILE)
    sae.eval()
    if device is not None:
        sae.to(device)
    return sae, cfg


def check_compatible(
    meta_or_sae: SparseAutoencoder | dict, d_model: int, model_name: str | None = None
) -> None:
    """ModelError unless the SAE reads activations of the model's width."""
    if isinstance(meta_or_sae, SparseAutoencoder):
        d_in = meta_or_sae.cfg.d_in
    else:
        d_in = meta_or_sae.get("d_in")
    if d_in is not None and int(d_in) != int(d_model):
        raise ModelError(
            f"SAE expects d_in={d_in} but model {model_name or '(unnamed)'} has d_model={d_model}."
        )


# -- SAELens ------------------------------------------------------------------------------------
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
    cfg = _read_json(cfg_path)
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
    t = _read_safetensors(weights_path)
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
                f"{cfg_path} describes an invalid TopK SAE ({_sentence(exc)})."
            ) from None
    else:
        sae = ImportedSAE(
            SAEConfig(arch=arch, d_in=d_in, width=d_sae, experts=1, active=1, k=d_sae)
        )
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
    if arch not in ("topk", *IMPORTED_ARCHS):
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
    _atomic_folder(folder, write, is_ours=lambda p: (p / SAELENS_WEIGHTS_FILE).exists())
    return folder


# -- helpers ------------------------------------------------------------------------------------
def _atomic_folder(
    folder: Path, write: Callable[[Path], None], is_ours: Callable[[Path], bool]
) -> None:
    """Build the folder under a temporary name beside it, then swap it in.

    An existing folder is replaced only if it is empty or holds the same kind of checkpoint,
    so a mistyped path never deletes a user's unrelated files.
    """
    if folder.exists():
        if not folder.is_dir():
            raise DataError(
                f"{folder} exists and is not a folder, so no checkpoint can be written there."
            )
        if any(folder.iterdir()) and not is_ours(folder):
            raise DataError(f"Refusing to replace {folder}: it is not an SAE checkpoint folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    old: Path | None = None
    try:
        write(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.replace(old / folder.name, folder)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a JSON object.")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path} is missing.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({_sentence(exc)}).") from None


def _load_tensors(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor], path: Path) -> None:
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


def _sentence(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".").splitlines()[0] if str(exc).strip() else type(exc).__name__


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _saelens_version() -> str:
    try:
        return _pkg_metadata.version("sae-lens")
    except _pkg_metadata.PackageNotFoundError:
        return "6.0.0"
