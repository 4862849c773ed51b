"""Shared fixtures. Models and corpora are cached under data/ (MOESAE_DATA), so only the
first test session pays for building tiny-random and parsing the stdlib docs."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from engine.models import TINY_MODEL, load_model

TINY_ACTS_CONFIG = dict(model=TINY_MODEL, tokens=3000, context_len=64, seed=0, shard_mb=0.05)
"""The harvest behind `tiny_acts`: ~3000 tokens of the default mix, 64-token contexts, shards
small enough (~0.05 MB) that train spans several of them."""


@pytest.fixture(scope="session")
def tiny_model():
    """The 2-layer random Llama (d_model 64) with the SmolLM2 tokenizer."""
    return load_model(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_acts(tiny_model, tmp_path_factory):
    """An ActivationStore of ~3000 tokens harvested from tiny_model at its default hook."""
    from engine.data.harvest import HarvestConfig, harvest
    from engine.options import set_flat

    out = tmp_path_factory.mktemp("acts") / "tiny"
    cfg = set_flat(HarvestConfig(), {**TINY_ACTS_CONFIG, "out": str(out)})
    return harvest(cfg, progress=False, model=tiny_model)


@pytest.fixture
def triton_interpreter():
    """engine.sae.kernels where its Triton kernels run on CPU tensors (through the interpreter,
    which the lines above turn on wherever there is no CUDA); the test is skipped where they
    cannot: no triton, or a CUDA machine (there tests/engine/sae/test_kernels.py runs the
    kernels compiled)."""
    pytest.importorskip("triton")
    from engine.sae import kernels

    if not kernels.interpreted():
        pytest.skip("CPU tensors need Triton's interpreter (on machines without CUDA)")
    return kernels


@pytest.fixture
def numba_kernels():
    """engine.sae.cpu_kernels with its numba kernels running. numba is a dependency, so a
    missing numba or kernels that fail their first try fail the test; only where a user
    switched them off (`MOESAE_NUMBA=0`) is it skipped."""
    from engine.sae import cpu_kernels

    if not cpu_kernels.ENABLED:
        pytest.skip("the numba kernels are switched off (MOESAE_NUMBA=0)")
    assert cpu_kernels.AVAILABLE, "numba is a dependency but does not import"
    assert cpu_kernels.works(), "numba imports but its kernels do not run here"
    return cpu_kernels

