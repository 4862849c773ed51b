"""Where generated data lives: `$MOESAE_DATA`, else `<repo>/data` (git-ignored)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The root folder for caches, harvests, runs and DuckDB builds (created on demand)."""
    root = Path(os.environ.get("MOESAE_DATA") or REPO_ROOT / "data").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: Path, write, binary: bool = False) -> None:
    """Write a file under a temporary name, fsync it, then rename it into place, so a reader
    or a crash never sees half a file. `write(f)` writes the content; OSError propagates
    (the temporary file is removed first)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
