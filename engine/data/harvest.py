"""Harvest activations at one hook into memory-mapped shards on disk, resumably.

The folder layout is described in `engine.data.activation_store`, which reads it back. Each
file is written to a temporary name and renamed; a shard counts only once the manifest lists
it. A killed harvest therefore resumes from its last complete shard when run again with the
same config. Splits are by context, so eval tokens never share a context with train ones.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import json
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..models import DEFAULT_MODEL, MODEL_FORWARDS, LoadedModel, load_model
from ..options import to_flat
from ..paths import atomic_write, data_dir
from ..runtime import DeviceConfig
from .activation_store import FORMAT_VERSION, SPLITS, ActivationStore, open_shard, read_manifest

OUTLIER_FACTOR = 10.0
"""Tokens whose norm exceeds this multiple of the running median are dropped (METHOD.md §3)."""
MEDIAN_WINDOW = 65_536
"""How many recent token norms the running median looks at."""


@dataclass
class SourceConfig:
    """Where activations come from: a model, a hook, a corpus, how many tokens. A harvest stores
    them; `moesae train` without --acts streams them (engine.data.stream)."""

    model: str | None = None
    """Model name, local HF folder or hub name (default: the offline SmolLM2-135M-Instruct)."""
    hook: str | None = None
    """TransformerLens hook name (default: the middle layer's residual stream)."""
    corpus: str | None = None
    """Comma-separated sources: pydoc, fortunes, bible, linux-docs, python-manual, a .txt/.jsonl path, hf:NAME[:split] (default: every built-in domain installed)."""
    tokens: int = 200_000
    """Number of tokens (train + eval)."""
    context_len: int = 128
    """Tokens per context, BOS included."""
    seed: int = 0
    """Seed for document order, context shuffling and the split."""
    eval_fraction: float = 0.1
    """Fraction of contexts held out for evaluation (of each shuffled block of 8,192)."""
    batch_contexts: int | None = None
    """Contexts per forward pass (default: 8 on the CPU, 256 on a GPU)."""
    drop_outliers: bool = True
    """Drop tokens whose norm is > 10x the running median."""
    model_dtype: str = "float32"
    """The model's weights and activations: float32, bfloat16 or float16 (on a GPU, bf16/fp16 are several times faster)."""
    model_forward: str = field(default="auto", metadata={"choices": MODEL_FORWARDS})
    """How activations are read: auto (the model's own Hugging Face forward pass with SDPA attention, stopped at the hook, once its first batch matched TransformerLens's bridge; else the bridge) or bridge (always TransformerLens's bridge)."""
    runtime: DeviceConfig = field(default_factory=DeviceConfig)
    """Where the model runs (--device)."""

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL


@dataclass
class HarvestConfig:
    """One harvest: the source of the activations and how they are stored."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """The model, hook, corpus and token count (--model, --hook, --corpus, --tokens, …)."""
    dtype: str = "float16"
    """Storage dtype: float16 or float32."""
    out: str | None = None
    """Output folder (default: data/acts/<name from the config>)."""
    shard_mb: float = 64.0
    """Approximate size of one shard file in MB."""


def default_out(cfg: HarvestConfig, hook: str) -> Path:
    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")

    src = cfg.source
    name = f"{slug(src.model_name)}__{slug(hook)}__{slug(src.corpus or 'mix')}__{src.tokens}t-L{src.context_len}-s{src.seed}"
    return data_dir() / "acts" / name


def check_source(src: SourceConfig) -> None:
    if src.tokens < 1:
        raise ConfigError(f"tokens must be positive, got {src.tokens}.")
    if src.context_len < 2:
        raise ConfigError(f"context_len must be at least 2, got {src.context_len}.")
    if not 0.0 <= src.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {src.eval_fraction}.")
    if src.batch_contexts is not None and src.batch_contexts < 1:
        raise ConfigError(f"batch_contexts must be positive, got {src.batch_contexts}.")
    if src.model_forward not in MODEL_FORWARDS:
        raise ConfigError(f"model_forward must be one of {', '.join(MODEL_FORWARDS)}, "
                          f"got {src.model_forward!r}.")


def _check(cfg: HarvestConfig) -> None:
    check_source(cfg.source)
    if cfg.dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be float16 or float32, got {cfg.dtype!r}.")
    if cfg.shard_mb <= 0:
        raise ConfigError(f"shard_mb must be positive, got {cfg.shard_mb}.")


# ---- small file helpers ----------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    try:
        atomic_write(path, lambda f: json.dump(obj, f, indent=1))
    except OSError as e:
        raise _write_error(path, e) from e


def _save_npy(path: Path, arr: np.ndarray | list[np.ndarray]) -> None:
    """`arr` as an .npy file, atomically; a list of arrays (of one dtype and row shape) is
    saved as their concatenation, written part by part without making it in memory."""
    def write(f) -> None:
        if isinstance(arr, np.ndarray):
            np.save(f, arr)
            return
        parts = [np.ascontiguousarray(a) for a in arr]
        shape = (sum(len(a) for a in parts), *parts[0].shape[1:])
        np.lib.format.write_array_header_1_0(f, {
            "descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False,
            "shape": shape})
        for a in parts:
            if a.size:
                f.write(memoryview(a.reshape(-1)).cast("B"))

    try:
        atomic_write(path, write, binary=True)
    except OSError as e:
        raise _write_error(path, e) from e


def _write_error(path: Path, e: OSError) -> DataError:
    if e.errno == errno.ENOSPC:
        return DataError(
            f"The disk filled up while writing {path}; free some space and run the same "
            "harvest again to resume from the last complete shard."
        )
    return DataError(f"Could not write {path} ({e.strerror or e}).")


# ---- harvest ---------------------------------------------------------------------------


NOT_IDENTITY = ("out", "batch_contexts", "device", "model_forward")
"""Options that change how a harvest runs, not what it stores."""


def _identity(cfg: HarvestConfig, lm: LoadedModel, hook: str) -> dict:
    """What must match for a folder to be resumed (flat option names)."""
    ident = to_flat(cfg)
    for key in NOT_IDENTITY:
        ident.pop(key)
    ident.update(hook=hook, model=lm.name, format=FORMAT_VERSION)
    if cfg.source.corpus is None:
        from .corpus import available_sources

        ident["corpus"] = "mix:" + ",".join(available_sources())
    return ident


def _plan(split: list[str], per_shard: int) -> list[dict]:
    """Shards as ranges of consecutive contexts that never mix splits."""
    plan = []
    for name in SPLITS:
        ids = [i for i, s in enumerate(split) if s == name]
        if not ids:
            continue
        lo, hi = ids[0], ids[-1] + 1  # train contexts come first, then eval
        for k, start in enumerate(range(lo, hi, per_shard)):
            plan.append(
                {
                    "file": f"{name}-{k:05d}",
                    "split": name,
                    "contexts": [start, min(start + per_shard, hi)],
                }
            )
    return plan


def eval_count(n_ctx: int, eval_fraction: float) -> int:
    """Contexts held out of `n_ctx`: round(n · fraction), at least one and at most n − 1 when
    there is a fraction and more than one context."""
    if eval_fraction <= 0:
        return 0
    n_eval = min(n_ctx - 1, round(n_ctx * eval_fraction))
    return max(1, n_eval) if n_ctx > 1 else n_eval


class ContextFeed:
    """A harvest's contexts [n, L] as they are tokenised, in the order the harvest stores them:
    each shuffled block's first contexts for training, in block order, then each block's last
    `eval_fraction` held out, in block order. `rows(a, b)` waits until rows a..b exist, so the
    forward passes start once the first block is tokenised (a background thread makes the rest).
    With one block — every harvest of at most `SHUFFLE_BLOCK` contexts — this is a shuffle of
    all contexts with the last fraction held out."""

    def __init__(self, tokens: np.ndarray, domains: list[str], split: list[str], block: int,
                 eval_fraction: float, streamed: bool):
        self.tokens, self.domains, self.split = tokens, domains, split
        self.block, self.eval_fraction, self.streamed = block, eval_fraction, streamed
        self.n_train = split.count("train")
        # the next row of each part (train, eval) to be filled
        self._next = [0, self.n_train] if streamed else [self.n_train, len(split)]
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.cancelled = False

    @classmethod
    def empty(cls, n: int, context_len: int, block: int, eval_fraction: float) -> ContextFeed:
        """Room for n contexts that a tokeniser will `put`, block by block."""
        sizes = [block] * (n // block) + ([n % block] if n % block else [])
        n_train = n - sum(eval_count(b, eval_fraction) for b in sizes)
        return cls(np.zeros((n, context_len), dtype=np.int32), [""] * n,
                   ["train"] * n_train + ["eval"] * (n - n_train), block, eval_fraction, True)

    @classmethod
    def of(cls, tokens: np.ndarray, domains: list[str], split: list[str]) -> ContextFeed:
        """Contexts that already exist (train ones first); nothing more is put."""
        return cls(tokens, list(domains), list(split), len(split), 0.0, False)

    @property
    def complete(self) -> bool:
        return self._next == [self.n_train, len(self.split)]

    def put(self, block) -> None:
        """Add the next block (corpus.Contexts) of the generation."""
        n_eval = eval_count(len(block), self.eval_fraction)
        cut = len(block) - n_eval
        with self._cond:
            for part, lo, hi in ((0, 0, cut), (1, cut, len(block))):
                at = self._next[part]
                self.tokens[at : at + hi - lo] = block.tokens[lo:hi]
                self.domains[at : at + hi - lo] = block.domains[lo:hi]
                self._next[part] = at + hi - lo
            self._cond.notify_all()

    @property
    def error(self) -> BaseException | None:
        """What stopped the tokeniser, if anything did."""
        return self._error

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Contexts start..stop (of one split), once they exist."""
        part = 0 if start < self.n_train else 1
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or stop <= self._next[part])
            if self._error is not None:
                raise self._error
        return self.tokens[start:stop]

    def wait(self) -> None:
        """Until every context exists."""
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self.complete)
            if self._error is not None:
                raise self._error


def _tokenise_into(feed: ContextFeed, src: SourceConfig, lm: LoadedModel, docs) -> None:
    from .corpus import context_blocks

    try:
        for block in context_blocks(lm, docs, src.context_len, src.tokens, src.seed, feed.block):
            if feed.cancelled:
                return
            feed.put(block)
    except BaseException as e:  # handed to the harvest loop, which raises it
        feed.fail(e)


def stream_contexts(src: SourceConfig, lm: LoadedModel) -> ContextFeed:
    """The contexts of `src`, tokenised by a background thread; returns once the first block
    is there (so errors that need no tokens, and a corpus shorter than one block, are raised
    here)."""
    from .corpus import SHUFFLE_BLOCK, load_corpus

    docs = load_corpus(src.corpus)
    body = src.context_len - (1 if lm.bos_token_id is not None else 0)
    n = -(-src.tokens // max(1, body))
    feed = ContextFeed.empty(n, src.context_len, SHUFFLE_BLOCK, src.eval_fraction)
    threading.Thread(target=_tokenise_into, args=(feed, src, lm, docs), daemon=True,
                     name="tokenise").start()
    feed.rows(0, 1)
    return feed


def split_contexts(src: SourceConfig, lm: LoadedModel) -> tuple[np.ndarray, list[str], list[str]]:
    """(tokens [n, L], domain per context, 'train'|'eval' per context) from the corpus, as a
    harvest of `src` stores them (`ContextFeed`)."""
    feed = stream_contexts(src, lm)
    feed.wait()
    return feed.tokens, feed.domains, feed.split


def save_contexts(out: Path, tokens: np.ndarray, domains: list[str], split: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "contexts.npy", tokens)
    _write_json(out / "contexts.json", {"domains": domains, "split": split})


def _digest(rows: np.ndarray) -> str:
    """What a shard's manifest entry records of its contexts' tokens: a resumed harvest, which
    tokenises again, checks that the corpus and tokenizer still give the same ones."""
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int32).tobytes()).hexdigest()


def _save_contexts_once(out: Path, contexts: ContextFeed) -> None:
    """Save tokenised contexts once all exist (contexts read from `out` are there already)."""
    if contexts.streamed or not (out / "contexts.npy").exists():
        contexts.wait()
        save_contexts(out, contexts.tokens, contexts.domains, contexts.split)


def _prepare_contexts(src: SourceConfig, lm: LoadedModel, out: Path) -> ContextFeed:
    tok_path, meta_path = out / "contexts.npy", out / "contexts.json"
    # Saved contexts are trusted only once a manifest vouches for the config they came from.
    if (out / "manifest.json").exists() and tok_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return ContextFeed.of(np.load(tok_path), meta["domains"], meta["split"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"The contexts saved in {out} are corrupt; delete the folder and harvest again."
            ) from e
    return stream_contexts(src, lm)  # the same contexts as a killed run's: they are seeded


def harvest(
    cfg: HarvestConfig,
    progress: bool = True,
    *,
    model: LoadedModel | None = None,
    on_shard: Callable[[int], None] | None = None,
    timings: dict | None = None,
) -> ActivationStore:
    """Run the model over the corpus and store activations at the hook; resumes a folder
    harvested with the same config, refuses one harvested with another. Tokenisation runs
    beside the forward passes (`ContextFeed`).
    `model`: an already loaded model named as the config names it (saves a reload);
    `on_shard(n_done)`: called after each committed shard (tests use it to simulate a crash);
    `timings`: gets the seconds of the main thread's parts (`HARVEST_PARTS`) after the model
    is loaded."""
    _check(cfg)
    src = cfg.source
    if model is not None and model.name != src.model_name:
        raise ConfigError(f"harvest was given model {model.name} but the config names {src.model_name}.")
    lm = model or load_model(src.model_name, device=src.runtime.device, dtype=src.model_dtype)
    lm.forward = src.model_forward
    hook = lm.resolve_hook(src.hook)
    out = Path(cfg.out).expanduser() if cfg.out else default_out(cfg, hook)
    identity = _identity(cfg, lm, hook)

    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        # a harvest made before an option existed was made with that option's default
        defaults = to_flat(HarvestConfig())
        old = {k: manifest["config"].get(k, defaults.get(k)) for k in identity}
        if old != identity:
            diff = [k for k in identity if old.get(k) != identity[k]]
            raise DataError(
                f"The folder {out} holds a harvest with a different configuration "
                f"({', '.join(diff) or 'format'}); choose another output folder or delete it."
            )
    existed = out.exists()
    clock = _Clock(timings)
    contexts = _prepare_contexts(src, lm, out)
    clock.lap("start")
    try:
        out.mkdir(parents=True, exist_ok=True)  # once there is text
        return write_shards(lm, hook, out, identity, contexts, cfg.dtype, cfg.shard_mb,
                            src.batch_contexts, src.drop_outliers, progress, on_shard,
                            timings=timings)
    except DataError as e:
        if e is not contexts.error:
            raise
        # The corpus ran out in a later block: the shards made so far belong to a token count
        # that cannot be harvested, so a folder this run created goes; an older one stays.
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
            raise
        raise DataError(f"{e} The folder {out} keeps what it held; delete it to harvest "
                        "fewer tokens there.") from e
    finally:
        contexts.cancelled = True  # a tokeniser still running stops at its next block


HARVEST_PARTS = {
    "start": "reading the corpus and tokenising its first block",
    "resume": "checking what an earlier run stored",
    "tokens": "waiting for the tokeniser",
    "forward": "forward passes",
    "device": "waiting for the GPU",
    "host": "checks",
    "writers": "waiting for the shard writers",
    "contexts": "saving the contexts",
    "finish": "the manifest",
}
"""Where a harvest's main thread spends its time (`harvest(timings=...)`), and how the CLI says
it: reading the corpus and tokenising the first block, checking the shards an earlier run
stored (and what comes before the loop), waiting for the tokeniser (later blocks), issuing
the model's forward passes (on the CPU: computing them; on a GPU the host
blocks here too once the GPU is busy), waiting for the GPU to finish a batch, checking and
gathering rows on the host, waiting for the shard writers, saving the contexts, and the
final manifest (with the normalisation scalar)."""


def describe_timings(timings: dict) -> str:
    """`timings` as one line: '12.3 s: forward passes 9.1 s, checks 0.6 s, …', largest first."""
    parts = sorted(((v, HARVEST_PARTS.get(k, k)) for k, v in timings.items() if v >= 0.05),
                   reverse=True)
    return f"{sum(timings.values()):.1f} s: " + ", ".join(f"{label} {v:.1f} s" for v, label in parts)


class _Clock:
    """Seconds of one thread, part by part: `lap(part)` adds the time since the last lap."""

    def __init__(self, into: dict | None):
        self.into = into if into is not None else {}
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.into[part] = self.into.get(part, 0.0) + now - self.t
        self.t = now


def _forward_ahead(
    lm: LoadedModel, hook: str, contexts: ContextFeed, spans: list[tuple[int, int, int]],
    first_pos: int, dtype: str, clock: _Clock | None = None,
) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(shard, start, stop, activations [n, d] in `dtype`, norms [n] float32, finite [n] bool,
    sq [n] float32) of each span of contexts, on the host, in order: `finite` and `sq` are
    whether each stored row is finite and its sum of squares, computed where the model runs
    (a host check over every stored value cost more than the forward pass on a GPU). On a GPU
    the next span's forward pass is queued before this span's results are waited for: its copy
    to pinned host memory is ordered before that forward on the stream, so the device computes
    while the host checks, filters and stores. On the CPU this is the plain loop."""
    store = torch.float16 if dtype == "float16" else torch.float32
    clock = clock or _Clock(None)
    pending = None
    for i, start, stop in spans:
        rows = contexts.rows(start, stop)
        clock.lap("tokens")
        x = lm.activations(torch.from_numpy(rows.astype(np.int64)), hook)
        x = x[:, first_pos:, :].reshape(-1, lm.d_model)
        norms = x.float().norm(dim=1)
        x = x.to(store)
        stats = [norms, torch.isfinite(x).all(1), x.float().square().sum(1)]
        ready = None
        if x.is_cuda:
            x = torch.empty(x.shape, dtype=store, pin_memory=True).copy_(x, non_blocking=True)
            stats = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                     for t in stats]
            ready = torch.cuda.Event()
            ready.record()
        clock.lap("forward")
        if pending is not None:
            yield _host_batch(*pending, clock)
        pending = (i, start, stop, x, stats, ready)
    if pending is not None:
        yield _host_batch(*pending, clock)


def _host_batch(i, start, stop, x, stats, ready, clock: _Clock):
    if ready is not None:
        ready.synchronize()  # this span's copy, not the forward queued after it
    clock.lap("device")
    return (i, start, stop, x.numpy(), *(t.numpy() for t in stats))


PINNED_SHARD_MB = 128
"""Up to this shard size a shard's rows stay views of the pinned buffers the GPU copied them
into until the shard is written (no host copy); a pinned buffer is freed only then, and
PyTorch keeps freed pinned blocks for reuse, so WRITERS + 2 shards of pinned memory (~0.6 GiB
at the default 64 MB) can be held. Larger shards copy their rows to pageable memory."""

WRITERS = 3
"""Shards written at once (files and their fsyncs overlap); the manifest still lists them in
order, each only once its files are on disk."""


def contexts_per_shard(shard_mb: float, body: int, d: int, dtype: str) -> int:
    """Contexts of `body` stored tokens a shard of `shard_mb` holds; a forward pass never
    crosses a shard, so this also bounds the contexts of one pass."""
    return max(1, int(shard_mb * 2**20 // (body * d * np.dtype(dtype).itemsize)))


def _kept_runs(x: np.ndarray, keep: np.ndarray) -> list[np.ndarray]:
    """The rows of x where `keep` holds, in order, as views of x: one per run of kept rows
    (a shard's parts are written one after the other, so nothing is copied on the host; an
    outlier in a batch used to cost a copy of the whole batch)."""
    if keep.all():
        return [x]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    runs = [x[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return runs or [x[:0]]  # none kept: still a part, so a shard of outliers alone is a 0-row file


def default_batch_contexts(device) -> int:
    """Contexts per forward pass when --batch-contexts is not given, for harvests and streams
    alike: 8 on the CPU, 256 on a GPU. Through TransformerLens's bridge a forward pass costs the
    host about the same time whatever its size (256 gave 250k tokens/s where 64 gave 135k on an
    H200); through the model's own forward pass an H100 harvested 5M tokens of SmolLM2 as fast
    with 256 as when asked for 1,024 (506k and 505k tokens/s, benchmarks/bench_gpu.py) — a pass
    never crosses a shard, so with 64 MB shards of d 576 that was 458 contexts a pass, and 256
    alternated with 202 — its GPU busy either way."""
    return 256 if str(device).startswith("cuda") else 8


def write_shards(
    lm: LoadedModel, hook: str, out: Path, identity: dict, contexts: ContextFeed,
    dtype: str = "float16", shard_mb: float = 64.0, batch_contexts: int | None = None,
    drop_outliers: bool = True, progress: bool = True,
    on_shard: Callable[[int], None] | None = None, norm_scale: float | None = None,
    timings: dict | None = None,
) -> ActivationStore:
    """The activations of `contexts`, shard by shard, resuming after the last complete one;
    the contexts are saved beside them (contexts.npy/.json) once every one exists.
    `norm_scale`: given (a held-out set of a stream, which has no training split of its own),
    else computed from the training split. `timings`: a dict that gets the seconds of the
    parts in `HARVEST_PARTS` added to it."""
    clock = _Clock(timings)
    d = lm.d_model
    first_pos = 1 if lm.bos_token_id is not None else 0
    manifest = read_manifest(out) if (out / "manifest.json").exists() else None
    tokens, split = contexts.tokens, contexts.split
    body = tokens.shape[1] - first_pos
    per_shard = contexts_per_shard(shard_mb, body, d, dtype)
    plan = _plan(split, per_shard)
    if manifest is None:
        manifest = {
            "format": FORMAT_VERSION,
            "config": identity,
            "model_name": lm.name,
            "hook": hook,
            "d_in": d,
            "dtype": dtype,
            "context_len": int(tokens.shape[1]),
            "first_position": first_pos,
            "n_contexts": int(len(tokens)),
            "shards": [],
            "complete": False,
            "norm_scale": None,
        }

    # Keep the longest prefix of listed shards that is intact and matches the plan.
    done: list[dict] = []
    for entry, planned in zip(manifest["shards"], plan, strict=False):
        if entry["file"] != planned["file"] or entry["contexts"] != planned["contexts"]:
            break
        if "tokens_sha1" in entry:  # tokenised again on a resume: the same contexts?
            if _digest(contexts.rows(*entry["contexts"])) != entry["tokens_sha1"]:
                break
        elif contexts.streamed and len(tokens) > contexts.block:
            raise DataError(
                f"The harvest in {out} was made by an earlier version, which shuffled all its "
                "contexts together, and its contexts.npy is missing; delete the folder and "
                "harvest again."
            )
        try:
            open_shard(out, entry, d, dtype)
            np.load(out / f"{entry['file']}.norms.npy", mmap_mode="r")
        except (DataError, OSError, ValueError):
            break
        done.append(entry)
    if done == manifest["shards"] and manifest.get("complete") and len(done) == len(plan):
        _save_contexts_once(out, contexts)
        clock.lap("resume")
        return ActivationStore(out)
    manifest.update(shards=done, complete=False, norm_scale=None)
    _write_json(out / "manifest.json", manifest)
    for stray in out.glob("*.tmp"):
        stray.unlink(missing_ok=True)

    history = np.concatenate(
        [np.zeros(0, np.float32)] + [np.load(out / f"{e['file']}.norms.npy") for e in done]
    )[-MEDIAN_WINDOW:]
    total = sum((p["contexts"][1] - p["contexts"][0]) * body for p in plan)
    bar = tqdm(
        total=total,
        initial=sum((e["contexts"][1] - e["contexts"][0]) * body for e in done),
        unit="tok",
        unit_scale=True,
        desc=f"harvest {hook}",
        disable=not progress,
        dynamic_ncols=True,
    )
    batch_contexts = batch_contexts or default_batch_contexts(lm.device)
    # Shards are written by background threads while the model computes the next ones; the
    # manifest lists a shard only once its files are on disk, in order, so a kill still resumes
    # cleanly.
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="shards")
    in_flight: collections.deque = collections.deque()

    def write_files(planned: dict, acts: list[np.ndarray], index: list[np.ndarray],
                    norms: np.ndarray) -> None:
        name = planned["file"]
        _save_npy(out / f"{name}.norms.npy", norms)
        _save_npy(out / f"{name}.idx.npy", index)
        _save_npy(out / f"{name}.npy", acts)

    def commit_oldest() -> None:
        planned, future, n, dropped, sum_sq = in_flight.popleft()
        future.result()  # its write errors surface here
        manifest["shards"].append(
            {**planned, "n_tokens": n, "dropped": dropped, "sum_sq": sum_sq,
             "tokens_sha1": _digest(tokens[slice(*planned["contexts"])])}
        )
        _write_json(out / "manifest.json", manifest)
        if on_shard is not None:
            on_shard(len(manifest["shards"]))

    todo = plan[len(done) :]
    spans = [(i, a, min(a + batch_contexts, p["contexts"][1]))
             for i, p in enumerate(todo) for a in range(p["contexts"][0], p["contexts"][1], batch_contexts)]
    clock.lap("resume")
    try:
        rows, index, norms_seen, dropped, sum_sq = [], [], [], 0, 0.0
        for i, start, stop, x, norms, finite, sq in _forward_ahead(lm, hook, contexts, spans,
                                                                  first_pos, dtype, clock):
            if not np.isfinite(norms).all():
                raise DataError(
                    f"Model {lm.name} produced NaN or infinite activations at {hook} "
                    f"(contexts {start}-{stop - 1}); check the model weights and dtype."
                )
            keep = np.ones(len(x), dtype=bool)
            if drop_outliers:
                median = float(np.median(np.concatenate([history, norms])))
                keep = norms <= OUTLIER_FACTOR * median
                dropped += int((~keep).sum())
            history = np.concatenate([history, norms])[-MEDIAN_WINDOW:]
            if not finite[keep].all():
                raise DataError(
                    f"Activations at {hook} overflow {dtype}; harvest again with dtype float32."
                )
            ctx = np.repeat(np.arange(start, stop, dtype=np.int32), body)
            pos = np.tile(np.arange(first_pos, first_pos + body, dtype=np.int32), stop - start)
            # views of x's own (pinned, on a GPU) buffer: no copy; shards larger than
            # PINNED_SHARD_MB take copies, so that the pinned memory held by the shards being
            # written stays bounded
            rows += _kept_runs(x, keep) if shard_mb <= PINNED_SHARD_MB else [x[keep]]
            index.append(np.stack([ctx, pos], axis=1)[keep])
            norms_seen.append(norms)
            sum_sq += float(sq[keep].sum(dtype=np.float64))
            bar.update((stop - start) * body)
            if stop == todo[i]["contexts"][1]:  # the shard is complete
                # its parts are written one after the other, never concatenated in memory
                future = writer.submit(write_files, todo[i], rows, index,
                                       np.concatenate(norms_seen).astype(np.float32))
                in_flight.append((todo[i], future, sum(len(r) for r in rows), dropped, sum_sq))
                rows, index, norms_seen, dropped, sum_sq = [], [], [], 0, 0.0
            clock.lap("host")
            # list each written shard as soon as those before it are (a kill loses at most the
            # shards still being written); wait only when WRITERS are busy
            while in_flight and (len(in_flight) > WRITERS or in_flight[0][1].done()):
                commit_oldest()
            clock.lap("writers")
        while in_flight:
            commit_oldest()
        clock.lap("writers")
        _save_contexts_once(out, contexts)
        clock.lap("contexts")
    finally:
        writer.shutdown(wait=True, cancel_futures=True)  # after a failure, no queued shard starts
        bar.close()

    if norm_scale is None:
        train = [s for s in manifest["shards"] if s["split"] == "train"]
        n_train = sum(s["n_tokens"] for s in train)
        if n_train == 0:
            raise DataError(f"No training tokens were kept in {out}; harvest more tokens.")
        norm_scale = math.sqrt(d / (sum(s["sum_sq"] for s in train) / n_train))
    manifest.update(
        complete=True,
        norm_scale=norm_scale,
        n_tokens={
            name: sum(s["n_tokens"] for s in manifest["shards"] if s["split"] == name)
            for name in SPLITS
        },
        dropped_outliers=sum(s["dropped"] for s in manifest["shards"]),
    )
    _write_json(out / "manifest.json", manifest)
    clock.lap("finish")
    return ActivationStore(out)

