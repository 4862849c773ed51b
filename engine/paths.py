"""Where generated data lives (`$MOESAE_DATA`, else `<repo>/data`, git-ignored), and the two
ways the engine writes anything: one file, or one folder, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The root folder for caches, harvests, runs and DuckDB builds (created on demand)."""
    root = Path(os.environ.get("MOESAE_DATA") or REPO_ROOT / "data").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: Path, write: Callable, binary: bool = False) -> None:
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


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent))


def atomic_folder(
    folder: str | Path,
    write: Callable[[Path], None],
    may_replace: Callable[[Path], bool] = lambda p: True,
    kind: str = "a folder this would replace",
) -> Path:
    """Build `folder` under a temporary name beside it, then swap it in.

    `write(tmp)` fills the temporary folder. An existing `folder` is replaced only when it is
    empty or `may_replace(folder)` says it is `kind`, so a mistyped path
    never deletes a user's unrelated files; if the swap fails the previous folder is put
    back. Leftovers of killed writers (`<name>.tmp-<pid>-…` of a dead process) are removed.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"{folder} exists and is not a folder, so nothing can be written there.")
        if any(folder.iterdir()) and not may_replace(folder):
            raise DataError(f"Refusing to replace {folder}: it is not {kind}.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    old: Path | None = None
    try:
        write(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{folder.name}.old-{os.getpid()}-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.replace(old / folder.name, folder)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _remove_stale(folder: Path) -> None:
    for kind in ("tmp", "old"):
        for p in folder.parent.glob(f"{folder.name}.{kind}-*"):
            pid = p.name[len(folder.name) + len(kind) + 2 :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if kind == "old" and not folder.exists() and (p / folder.name).is_dir():
                    os.replace(p / folder.name, folder)  # a swap was interrupted half-way
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
