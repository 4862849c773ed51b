import errno
import json
import shutil

import numpy as np
import pytest
import torch

from engine.data.activation_store import ActivationStore
from engine.data.harvest import HarvestConfig, harvest
from engine.errors import DataError
from engine.options import set_flat
from tests.conftest import TINY_ACTS_CONFIG


def _cfg(out, **kw):
    return set_flat(HarvestConfig(), {**TINY_ACTS_CONFIG, **kw, "out": str(out)})


def _all_arrays(store):
    out = {}
    for split in ("train", "eval"):
        ts = store.split(split)
        out[split] = (ts.read(np.arange(ts.n_tokens)), ts.context_ids.copy(), ts.positions.copy())
    return out


def _assert_same(a, b):
    x, y = _all_arrays(a), _all_arrays(b)
    for split in x:
        for u, v in zip(x[split], y[split], strict=True):
            np.testing.assert_array_equal(u, v)
    assert a.norm_scale == b.norm_scale
    np.testing.assert_array_equal(a.contexts().tokens, b.contexts().tokens)


class _Crash(Exception):
    pass


def test_token_count_and_bos_dropped(tiny_acts, tiny_model):
    m = tiny_acts.manifest
    tokens, domains, split = tiny_acts.contexts()
    assert tokens.shape == (48, 64)  # ceil(3000 / 63) contexts of 64 with BOS first
    assert (tokens[:, 0] == tiny_model.bos_token_id).all()
    kept = m["n_tokens"]["train"] + m["n_tokens"]["eval"]
    assert kept + m["dropped_outliers"] == 48 * 63
    assert len(m["shards"]) > 2 and tiny_acts.d_in == 64
    for name in ("train", "eval"):
        ts = tiny_acts.split(name)
        assert ts.n_tokens == m["n_tokens"][name] > 0
        assert ts.positions.min() >= 1  # BOS (position 0) never stored
        assert {split[c] for c in np.unique(ts.context_ids)} == {name}
    assert set(domains) >= {"pydoc"} and split.count("eval") == 5


def test_norm_scale_gives_unit_mean_square(tiny_acts):
    ts = tiny_acts.split("train")
    x = ts.read(np.arange(ts.n_tokens)) * tiny_acts.norm_scale
    assert np.mean(np.sum(x**2, axis=1)) == pytest.approx(tiny_acts.d_in, rel=1e-3)


def test_read_and_iter_chunks_agree(tiny_acts):
    ts = tiny_acts.split("train")
    whole = np.concatenate([c for _, c in ts.iter_chunks(333)])
    assert whole.dtype == np.float32 and whole.shape == (ts.n_tokens, 64)
    idx = np.random.default_rng(0).permutation(ts.n_tokens)[:500]
    np.testing.assert_array_equal(ts.read(idx), whole[idx])
    starts = [s for s, _ in ts.iter_chunks(333)]
    assert starts == list(range(0, ts.n_tokens, 333))


def test_rows_match_a_fresh_forward_pass(tiny_acts, tiny_model):
    tokens, _, _ = tiny_acts.contexts()
    ts = tiny_acts.split("eval")
    c = int(ts.context_ids[0])
    fresh = tiny_model.activations(
        torch.tensor(tokens[c : c + 1], dtype=torch.long), tiny_acts.hook
    )[0]
    rows = np.flatnonzero(ts.context_ids == c)
    expect = fresh[ts.positions[rows]].numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(ts.read(rows), expect, rtol=1e-3, atol=1e-3)


def test_resume_after_crash_matches_uninterrupted(tiny_acts, tiny_model, tmp_path):
    out = tmp_path / "resumed"

    def crash(n_done):
        if n_done == 1:
            raise _Crash

    with pytest.raises(_Crash):
        harvest(_cfg(out), progress=False, model=tiny_model, on_shard=crash)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    with pytest.raises(DataError, match="incomplete"):
        ActivationStore(out)
    (out / "train-00001.npy.tmp").write_bytes(b"half a shard")  # as if killed mid-write
    _assert_same(harvest(_cfg(out), progress=False, model=tiny_model), tiny_acts)
    assert not list(out.glob("*.tmp"))


def test_other_config_in_same_folder_is_refused(tiny_acts, tiny_model):
    with pytest.raises(DataError, match="different configuration"):
        harvest(_cfg(tiny_acts.path, seed=1), progress=False, model=tiny_model)


def test_missing_or_corrupt_shard(tiny_acts, tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_acts.path, copy)
    shard = copy / "train-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-00001 .* missing or corrupt"):
        ActivationStore(copy)
    shard.unlink()
    with pytest.raises(DataError, match="missing or corrupt"):
        ActivationStore(copy)
    with pytest.raises(DataError, match="manifest.json is missing"):
        ActivationStore(tmp_path / "nowhere")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        ActivationStore(copy)


def test_rerun_rebuilds_a_damaged_shard(tiny_acts, tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_acts.path, copy)
    (copy / "train-00002.npy").unlink()
    _assert_same(harvest(_cfg(copy), progress=False, model=tiny_model), tiny_acts)


def test_nan_activations_are_a_data_error(tiny_model, tmp_path, monkeypatch):
    def nan_acts(tokens, hook=None):
        return torch.full((*tokens.shape, tiny_model.d_model), float("nan"))

    monkeypatch.setattr(tiny_model, "activations", nan_acts)
    with pytest.raises(DataError, match="NaN or infinite"):
        harvest(_cfg(tmp_path / "nan"), progress=False, model=tiny_model)


def test_disk_full_keeps_manifest_valid(tiny_acts, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real = np.lib.format.write_array
    calls = {"n": 0}

    def write_array(fp, array, *args, **kwargs):
        calls["n"] += 1
        # contexts.npy, shard 1's norms, index and activations, shard 2's norms and index,
        # then shard 2's activations: the disk fills up there
        if calls["n"] == 7:
            fp.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    with pytest.raises(DataError, match="disk filled up"):
        harvest(_cfg(out), progress=False, model=tiny_model)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["train-00000"]
    assert not list(out.glob("*.tmp"))
    _assert_same(harvest(_cfg(out), progress=False, model=tiny_model), tiny_acts)


def test_the_next_forward_is_launched_before_a_batch_is_handed_out():
    """The harvest loop gets batch i only after the model's forward for batch i+1 was launched
    (on a GPU the device then computes while the host filters and stores); batches arrive in
    order with their own values, the first position dropped, and their norms."""
    from engine.data.harvest import _forward_ahead

    launched = []

    class Model:
        d_model = 3

        def activations(self, tokens, hook):
            launched.append(int(tokens[0, 0]))
            return tokens[..., None].float().expand(-1, -1, 3) * torch.tensor([1.0, 2.0, 2.0])

    tokens = np.repeat(np.arange(5)[:, None], 4, axis=1)  # context c holds the token c, 4 times
    spans = [(0, 0, 2), (0, 2, 4), (1, 4, 5)]  # (shard, first context, end)
    got = []
    for shard, start, stop, x, norms in _forward_ahead(Model(), "h", tokens, spans, 1, "float16"):
        got.append((shard, start, stop, len(launched)))
        want = np.repeat(np.arange(start, stop), 3)[:, None] * np.array([1.0, 2.0, 2.0])
        assert x.dtype == np.float16 and np.array_equal(x, want)
        assert np.allclose(norms, 3 * np.repeat(np.arange(start, stop), 3))
    assert got == [(0, 0, 2, 2), (0, 2, 4, 3), (1, 4, 5, 3)]
