"""How long PyTorch's idle OpenMP threads spin on the CPU, set before PyTorch loads.

PyTorch's CPU build runs its parallel kernels on libgomp's threads, which after each parallel
region spin for 300,000 rounds before they sleep (libgomp's default; milliseconds at the cost
of a round's pause instruction — an estimate, not timed here). A CPU training step runs the
numba kernels (engine/sae/cpu_kernels.py) on a pool of threads of their own right after
PyTorch's kernels, and while it spins a worker holds the core one of the pool's threads needs.
Inside training steps on the 2-core development machine (2026-11-27, bench_train.py's size,
medians of 18 steps in each of two processes): both decoder gradients took 8.6–8.7 ms in Scale
e=2 steps where they take 4.5–4.9 ms called alone, the TopK over its expert rows 7.0 ms (alone
3.7–4.5), dense TopK's TopK 16.3–16.9 ms (alone ~11); in processes with GOMP_SPINCOUNT at
10,000 (1/30 of the default; 1,000 and 50,000 did about as well) 4.9–5.1, 4.5 and 12.7–13.9
ms. A model's forward pass (PyTorch's kernels alone) took the same time either way.

libgomp reads the variable once, when it is loaded (at `import torch`), so importing this module
sets it, and must come first: the `moesae` command imports it before anything else
(engine/cli/__init__.py), and so do the benchmarks that time its steps. A value the environment
already has is kept, and so is any OMP_WAIT_POLICY (which sets libgomp's spinning its own way).
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"
"""libgomp's rounds of spinning before an idle thread sleeps (its default: 300,000)."""


def spin_briefly() -> None:
    """Set GOMP_SPINCOUNT to SPIN_COUNT where the environment sets neither it nor
    OMP_WAIT_POLICY (it takes effect only if torch is not imported yet)."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


spin_briefly()
