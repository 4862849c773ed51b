"""engine/openmp.py: the `moesae` command sets libgomp's spinning before torch is imported
(libgomp reads it once, when torch loads it), and leaves a user's own setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SPY = """
import builtins, os
seen = []
real = builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append(os.environ.get("GOMP_SPINCOUNT", "unset"))
    return real(name, *args, **kwargs)
builtins.__import__ = spy
import engine.cli
print(seen[0] if seen else "torch never imported")
"""


@pytest.mark.parametrize("env,want", [
    ({}, "10000"),
    ({"GOMP_SPINCOUNT": "123"}, "123"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "unset"),
], ids=["default", "the user's count", "the user's policy"])
def test_the_command_sets_the_spin_count_before_torch_loads(env, want):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", _SPY], env=base | env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == want
