"""The trainer's batch sources: the same batches from every in-memory source, a pure
function of (seed, step), each token once per epoch, and no per-step permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import batches as B
from engine.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def store(tiny_acts):
    return tiny_acts


def _all(source, steps):
    return [source.batch(s).clone() for s in steps]


def test_resident_pinned_and_memmap_serve_the_same_batches(store):
    cpu = torch.device("cpu")
    steps = [0, 1, 2, 9, 3, 25, 24]  # out of order and across epochs: a pure function of step
    ref = _all(B.MemmapBatches(store, 256, 3, cpu), steps)
    for cls in (B.ResidentBatches, B.PinnedBatches):
        src = cls(store, 256, 3, cpu)
        for a, b in zip(ref, _all(src, steps), strict=True):
            assert torch.equal(a, b), cls.__name__
        getattr(src, "close", lambda: None)()
    x = store.split("train").read(B.batch_indices(store.split("train").n_tokens, 256, 9, 3))
    assert torch.allclose(ref[3], torch.from_numpy(x) * store.norm_scale)


def test_epoch_order_is_drawn_once_per_epoch(monkeypatch):
    calls = []
    real = np.random.default_rng

    def counting(seed):
        calls.append(tuple(seed))
        return real(seed)

    monkeypatch.setattr(B.np.random, "default_rng", counting)
    order = B.EpochOrder(10_000, 100, seed=1)
    seen = np.concatenate([order.indices(s) for s in range(100)])
    assert calls == [(1, 0)]  # one permutation for the whole epoch, none per step
    assert np.array_equal(np.sort(seen), np.arange(10_000))


def test_chunked_is_deterministic_and_sees_each_token_at_most_once_per_epoch(store):
    cpu = torch.device("cpu")
    a = B.ChunkedBatches(store, 64, 5, cpu, chunk_tokens=128, window=3)
    b = B.ChunkedBatches(store, 64, 5, cpu, chunk_tokens=128, window=3)
    steps = list(range(a.per_epoch))
    rows_a = _all(a, steps)
    rows_b = _all(b, reversed(steps))[::-1]  # any order of asking gives the same batches
    for x, y in zip(rows_a, rows_b, strict=True):
        assert torch.equal(x, y) and x.shape == (64, store.d_in)
    rows = np.concatenate([a.rows_of(s) for s in steps])
    assert len(np.unique(rows)) == len(rows)  # no token twice in one epoch
    assert len(rows) >= 0.5 * store.split("train").n_tokens
    data = store.split("train")
    assert torch.allclose(rows_a[3], torch.from_numpy(data.read(a.rows_of(3))) * store.norm_scale)
    a.close()
    b.close()


def test_auto_and_bad_choices(store):
    cpu = torch.device("cpu")
    assert B.choose_source(1000, 64, cpu) == "resident"
    assert B.choose_source(10**12, 64, cpu) == "chunked"
    with pytest.raises(ConfigError, match="Unknown batch source"):
        B.harvest_batches(store, 64, 0, cpu, "magic")
    with pytest.raises(DataError, match="fewer than one batch"):
        B.harvest_batches(store, 10**9, 0, cpu, "auto")
