"""Reading helpers every checkpoint format shares: one clear DataError sentence per problem,
and nothing ever unpickled (tensors through safetensors, the rest through JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import DataError

CFG_FILE = "cfg.json"


def read_json(path: Path) -> dict:
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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path} is missing.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({sentence(exc)}).") from None


def sentence(exc: BaseException) -> str:
    """The first line of an exception's message, without a final full stop."""
    return str(exc).strip().rstrip(".").splitlines()[0] if str(exc).strip() else type(exc).__name__


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
