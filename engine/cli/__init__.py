"""The `moesae` command line: `main.py` builds the parser from one module per verb, `args.py`
generates flags from the config dataclasses."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
