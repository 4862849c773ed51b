"""engine.paths.atomic_folder: the one way the engine writes a folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.errors import DataError
from engine.paths import atomic_folder


def _write(text):
    def write(tmp):
        (tmp / "a.txt").write_text(text)
    return write


def test_writes_and_replaces_only_its_own_kind(tmp_path):
    target = tmp_path / "ck"
    atomic_folder(target, _write("one"), may_replace=lambda p: (p / "a.txt").exists())
    atomic_folder(target, _write("two"), may_replace=lambda p: (p / "a.txt").exists())
    assert (target / "a.txt").read_text() == "two"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="Refusing to replace .* it is not an SAE checkpoint folder"):
        atomic_folder(other, _write("x"), may_replace=lambda p: (p / "a.txt").exists(),
                      kind="an SAE checkpoint folder")
    assert (other / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]


def test_failed_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "ck"
    atomic_folder(target, _write("one"))

    def broken(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_folder(target, broken)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"ck.tmp-{dead}-abc"
    stale.mkdir()
    alive = tmp_path / f"ck.tmp-{os.getppid()}-def"  # a live process's work is left alone
    alive.mkdir()
    atomic_folder(tmp_path / "ck", _write("one"))
    assert not stale.exists() and alive.exists()
