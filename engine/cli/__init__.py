"""The `moesae` command line: `main.py` builds the parser from one module per verb, `args.py`
generates flags from the config dataclasses."""

from .. import openmp  # noqa: F401 - first: it sets OpenMP's spinning before torch loads (.main)
from .main import build_parser, main

__all__ = ["build_parser", "main"]
