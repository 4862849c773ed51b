import errno
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from engine.data import corpus
from engine.data.activation_store import ActivationStore
from engine.data.harvest import ContextFeed, HarvestConfig, eval_count, harvest, split_contexts
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


def test_activations_float16_cannot_hold_are_one_sentence(tiny_model, tmp_path, monkeypatch):
    """Finite in float32, infinite once stored as float16 (whose largest value is 65504): the
    overflow is found where the model runs, and named with its way out."""
    def huge(tokens, hook=None):
        x = torch.ones((*tokens.shape, tiny_model.d_model))
        x[..., 0] = 1e5
        return x

    monkeypatch.setattr(tiny_model, "activations", huge)
    with pytest.raises(DataError, match="overflow float16; harvest again with dtype float32"):
        harvest(_cfg(tmp_path / "big"), progress=False, model=tiny_model)


def test_nan_activations_are_a_data_error(tiny_model, tmp_path, monkeypatch):
    def nan_acts(tokens, hook=None):
        return torch.full((*tokens.shape, tiny_model.d_model), float("nan"))

    monkeypatch.setattr(tiny_model, "activations", nan_acts)
    with pytest.raises(DataError, match="NaN or infinite"):
        harvest(_cfg(tmp_path / "nan"), progress=False, model=tiny_model)


def test_disk_full_keeps_manifest_valid(tiny_acts, tiny_model, tmp_path, monkeypatch):
    from engine.data import harvest as harvest_module

    out = tmp_path / "full"
    real = harvest_module.atomic_write

    class FillsUp:
        """A file that takes `room` bytes, then fails as a full disk does."""

        def __init__(self, f, room):
            self.f, self.room = f, room

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > self.room:
                self.f.write(data[: self.room])
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

    def atomic_write(path, write, binary=False):
        # shard 2's activations (its norms and index are written first): the disk fills up
        # there, part way through the real writer (after its header and some rows), whichever
        # of the shards being written at once gets there first (the contexts are saved last,
        # so the rerun tokenises them again)
        if str(path).endswith("train-00001.npy"):
            return real(path, lambda f: write(FillsUp(f, 1000)), binary)
        return real(path, write, binary)

    monkeypatch.setattr(harvest_module, "atomic_write", atomic_write)
    with pytest.raises(DataError, match="disk filled up"):
        harvest(_cfg(out), progress=False, model=tiny_model)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["train-00000"]
    assert not list(out.glob("*.tmp")) and not (out / "contexts.npy").exists()
    _assert_same(harvest(_cfg(out), progress=False, model=tiny_model), tiny_acts)


def test_shards_larger_than_the_pinned_limit_copy_their_rows_to_the_same_result(
        tiny_acts, tiny_model, tmp_path, monkeypatch):
    from engine.data import harvest as harvest_module

    runs = []
    real = harvest_module._kept_runs
    monkeypatch.setattr(harvest_module, "_kept_runs", lambda x, keep: runs.append(1) or real(x, keep))
    monkeypatch.setattr(harvest_module, "PINNED_SHARD_MB", 0.01)  # below the tiny shards' 0.05
    _assert_same(harvest(_cfg(tmp_path / "copied"), progress=False, model=tiny_model), tiny_acts)
    assert runs == []  # every batch was copied, none kept as views


def test_a_harvest_says_where_its_main_thread_spent_its_time(tiny_model, tmp_path):
    import time

    from engine.data.harvest import HARVEST_PARTS, describe_timings

    timings: dict = {}
    t = time.perf_counter()
    harvest(_cfg(tmp_path / "h"), progress=False, model=tiny_model, timings=timings)
    wall = time.perf_counter() - t
    assert set(timings) <= set(HARVEST_PARTS) and {"start", "forward", "host"} <= set(timings)
    assert all(v >= 0 for v in timings.values()) and timings["forward"] > 0
    assert sum(timings.values()) <= wall  # parts of one thread's time, none counted twice
    assert describe_timings({"forward": 2.0, "start": 0.5, "host": 0.01}) == (
        "2.5 s: forward passes 2.0 s, reading the corpus and tokenising its first block 0.5 s")


def test_the_next_forward_is_launched_before_a_batch_is_handed_out():
    """The harvest loop gets batch i only after the model's forward for batch i+1 was launched
    (on a GPU the device then computes while the host filters and stores); batches arrive in
    order with their own values, the first position dropped, their norms, and whether each
    stored row is finite with its sum of squares (both computed where the model runs)."""
    from engine.data.harvest import _forward_ahead

    launched = []

    class Model:
        d_model = 3

        def activations(self, tokens, hook):
            launched.append(int(tokens[0, 0]))
            return tokens[..., None].float().expand(-1, -1, 3) * torch.tensor([1.0, 2.0, 2.0])

    tokens = np.repeat(np.arange(5)[:, None], 4, axis=1)  # context c holds the token c, 4 times
    contexts = ContextFeed.of(tokens, ["d"] * 5, ["train"] * 5)
    spans = [(0, 0, 2), (0, 2, 4), (1, 4, 5)]  # (shard, first context, end)
    got = []
    for shard, start, stop, x, norms, finite, sq in _forward_ahead(Model(), "h", contexts, spans, 1,
                                                                   "float16"):
        got.append((shard, start, stop, len(launched)))
        want = np.repeat(np.arange(start, stop), 3)[:, None] * np.array([1.0, 2.0, 2.0])
        assert x.dtype == np.float16 and np.array_equal(x, want)
        assert np.allclose(norms, 3 * np.repeat(np.arange(start, stop), 3))
        assert finite.all() and np.allclose(sq, np.square(want).sum(1))
    assert got == [(0, 0, 2, 2), (0, 2, 4, 3), (1, 4, 5, 3)]


def test_tokenisation_runs_beside_the_forward_passes(tiny_model, tmp_path, monkeypatch):
    """In blocks of 8 contexts (48 in all), the first forward pass runs before the tokeniser
    makes its second block: the tokeniser waits for it, which would time out if tokenising
    came first. The harvest stores the block layout: each block's first 7 contexts for
    training, its last one held out, the same contexts as `split_contexts` makes."""
    monkeypatch.setattr(corpus, "SHUFFLE_BLOCK", 8)
    first_forward = threading.Event()
    waited = []
    real_blocks, real_acts = corpus.context_blocks, tiny_model.activations

    def blocks(*args, **kwargs):
        for i, block in enumerate(real_blocks(*args, **kwargs)):
            if i == 1:
                waited.append(first_forward.wait(timeout=60))
            yield block

    def activations(tokens, hook=None):
        first_forward.set()
        return real_acts(tokens, hook)

    monkeypatch.setattr(corpus, "context_blocks", blocks)
    monkeypatch.setattr(tiny_model, "activations", activations)
    store = harvest(_cfg(tmp_path / "blocks"), progress=False, model=tiny_model)
    assert waited == [True]
    saved = store.contexts()
    tokens, domains, split = split_contexts(_cfg(tmp_path).source, tiny_model)
    np.testing.assert_array_equal(saved.tokens, tokens)
    n = len(tokens)
    assert n == 48 and split == ["train"] * 42 + ["eval"] * 6 == list(saved.split)
    generated = np.concatenate([b.tokens for b in real_blocks(
        tiny_model, corpus.load_corpus(None), 64, 3000, 0, block=8)])
    for b in range(6):  # block b: 7 training contexts, then its held-out one
        np.testing.assert_array_equal(tokens[7 * b : 7 * b + 7], generated[8 * b : 8 * b + 7])
        np.testing.assert_array_equal(tokens[42 + b], generated[8 * b + 7])


def test_a_harvest_in_blocks_resumes_to_the_same_result(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHUFFLE_BLOCK", 8)
    whole = harvest(_cfg(tmp_path / "whole"), progress=False, model=tiny_model)

    def crash(n_done):
        if n_done == 2:
            raise _Crash

    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        harvest(_cfg(out), progress=False, model=tiny_model, on_shard=crash)
    assert not (out / "contexts.npy").exists()  # saved once every shard is: tokenised again
    _assert_same(harvest(_cfg(out), progress=False, model=tiny_model), whole)


def test_one_block_is_a_shuffle_of_every_context(tiny_model):
    """A harvest of at most one block: the generated contexts in one seeded permutation, the
    last tenth held out — a harvest of that size made before blocks existed is the same."""
    docs = corpus.load_corpus(None)
    rows = [r for r, _ in corpus._generate(tiny_model, docs, 64, 48, 0)]
    order = np.random.default_rng(0).permutation(48)
    got = corpus.make_contexts(tiny_model, docs, 64, 3000, 0)
    np.testing.assert_array_equal(got.tokens, np.asarray(rows, np.int32)[order])
    assert eval_count(48, 0.1) == 5 and eval_count(1, 0.1) == 0 and eval_count(2, 0.01) == 1
    assert eval_count(10, 0.0) == 0


def test_a_corpus_that_runs_out_in_a_later_block_is_one_sentence(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHUFFLE_BLOCK", 4)
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"word{i}" for i in range(600)))
    with pytest.raises(DataError, match="fewer than the 30,000 asked for"):
        harvest(_cfg(tmp_path / "short", corpus=str(text), tokens=30_000), progress=False,
                model=tiny_model)
    assert not (tmp_path / "short").exists()  # its shards belong to a count that cannot be made


def test_a_resume_after_the_corpus_changed_redoes_the_shards_it_changed(tiny_model, tmp_path,
                                                                          monkeypatch):
    """A resumed harvest tokenises again; each shard's manifest entry records a digest of its
    contexts, so shards whose contexts changed are harvested again, not mixed in."""
    monkeypatch.setattr(corpus, "SHUFFLE_BLOCK", 8)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"alpha{i}" for i in range(3000)))
    cfg = dict(corpus=str(text), tokens=1500)

    def crash(n_done):
        if n_done == 2:
            raise _Crash

    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        harvest(_cfg(out, **cfg), progress=False, model=tiny_model, on_shard=crash)
    text.write_text(" ".join(f"beta{i}" for i in range(3000)))
    fresh = harvest(_cfg(tmp_path / "fresh", **cfg), progress=False, model=tiny_model)
    _assert_same(harvest(_cfg(out, **cfg), progress=False, model=tiny_model), fresh)


def test_an_older_harvest_in_blocks_without_its_contexts_is_refused(tiny_model, tmp_path,
                                                                    monkeypatch):
    """A harvest of more than one block made before blocks existed shuffled every context
    together; without its contexts.npy they cannot be made again, which is one sentence."""
    monkeypatch.setattr(corpus, "SHUFFLE_BLOCK", 8)
    out = tmp_path / "old"
    harvest(_cfg(out), progress=False, model=tiny_model)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["tokens_sha1"]  # as an earlier version wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "contexts.npy").unlink()
    with pytest.raises(DataError, match="earlier version"):
        harvest(_cfg(out), progress=False, model=tiny_model)


def test_a_complete_harvest_whose_contexts_were_deleted_gets_them_back(tiny_acts, tiny_model,
                                                                         tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_acts.path, copy)
    (copy / "contexts.npy").unlink()
    _assert_same(harvest(_cfg(copy), progress=False, model=tiny_model), tiny_acts)


def test_each_shard_records_the_sum_of_squares_of_what_it_stores(tiny_acts):
    """The sums of squares behind the normalisation scale are summed from per-row sums made
    beside the forward pass; they equal those of the stored shards."""
    for entry in tiny_acts.manifest["shards"]:
        x = np.load(tiny_acts.path / f"{entry['file']}.npy").astype(np.float64)
        assert entry["sum_sq"] == pytest.approx(float(np.square(x).sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int32"])
def test_a_shard_saved_part_by_part_is_the_file_of_their_concatenation(tmp_path, dtype):
    from engine.data.harvest import _save_npy

    g = np.random.default_rng(0)
    parts = [(g.standard_normal((n, 5)) * 100).astype(dtype) for n in (7, 0, 12, 1)]
    parts[2] = parts[2][::2]  # not contiguous: copied once, then written
    _save_npy(tmp_path / "parts.npy", parts)
    np.save(tmp_path / "whole.npy", np.concatenate(parts))
    assert (tmp_path / "parts.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "parts.npy", mmap_mode="r"), np.concatenate(parts))


@pytest.mark.parametrize("keep", [[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 1],
                                  [0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1]])
def test_kept_runs_are_views_of_the_kept_rows(keep, tmp_path):
    from engine.data.harvest import _kept_runs, _save_npy

    x = np.arange(18, dtype=np.float16).reshape(6, 3)
    keep = np.array(keep, dtype=bool)
    runs = _kept_runs(x, keep)
    assert runs and all(np.shares_memory(r, x) or r.size == 0 for r in runs)  # views, no copies
    np.testing.assert_array_equal(np.concatenate(runs), x[keep])
    _save_npy(tmp_path / "s.npy", runs)  # a shard of outliers alone is a 0-row file
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy", mmap_mode="r"), x[keep])
