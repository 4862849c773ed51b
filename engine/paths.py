"""Where generated data lives: `$MOESAE_DATA`, else `<repo>/data` (git-ignored)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The root folder for caches, harvests, runs and DuckDB builds (created on demand)."""
    root = Path(os.environ.get("MOESAE_DATA") or REPO_ROOT / "data").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
