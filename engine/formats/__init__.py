"""SAE checkpoint formats behind one registry of loaders.

`load_sae(folder)` reads any registered format: our own (`native`), and foreign ones that
`moesae import` converts: `saelens`, and `dictionary_learning` (the checkpoints of the Scale
SAE authors' code and of the Switch SAE reference). Adding a format is one module with a `detect`
and a `load` function plus one `register_format(...)` line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..sae import SparseAutoencoder
from . import dictionary_learning, native, saelens
from .native import save_sae


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]
    """Whether a folder holds a checkpoint of this format (cheap: reads cfg files only)."""
    load: Callable[[Path], tuple[SparseAutoencoder, dict]]
    """(SAE on the CPU, metadata dict with at least model, hook, d_in) of such a folder."""
    foreign: bool
    """True for formats `moesae import` converts into ours."""


_FORMATS: list[Format] = []


def register_format(fmt: Format) -> None:
    _FORMATS.append(fmt)


register_format(Format("native", native.is_native, native.load_native, foreign=False))
register_format(Format("saelens", saelens.is_saelens, saelens.import_saelens, foreign=True))
register_format(Format("dictionary_learning", dictionary_learning.is_dictionary_learning,
                       dictionary_learning.import_dictionary_learning, foreign=True))


def detect(folder: str | Path) -> Format | None:
    folder = Path(folder)
    return next((f for f in _FORMATS if folder.is_dir() and f.detect(folder)), None)


def load_sae(
    folder: str | Path, device: str | torch.device | None = None
) -> tuple[SparseAutoencoder, dict]:
    """Read a checkpoint folder of any registered format → (SAE in eval mode, metadata dict).

    Every problem with the files raises DataError naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"No SAE checkpoint folder at {folder}.")
    fmt = detect(folder)
    sae, meta = (fmt.load if fmt is not None else native.load_native)(folder)
    sae.eval()
    if device is not None:
        sae.to(device)
    return sae, meta


def import_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict, str]:
    """(SAE, metadata, format name) of a foreign checkpoint folder, for `moesae import`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"No SAE folder at {folder}.")
    fmt = detect(folder)
    if fmt is None or not fmt.foreign:
        known = ", ".join(f.name for f in _FORMATS if f.foreign)
        raise DataError(
            f"{folder} is not a checkpoint of a format that can be imported ({known})."
            if fmt is None else f"{folder} is already in this tool's format; nothing to import."
        )
    sae, meta = fmt.load(folder)
    return sae, meta, fmt.name


__all__ = ["Format", "detect", "import_sae", "load_sae", "register_format", "save_sae"]
