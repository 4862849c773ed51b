"""Where the trainer's batches come from.

The trainer asks a `BatchSource` for the batch of a step; it never reads files itself, so a
streaming buffer or a distributed sampler plugs in here. Batches are a pure function of
(seed, step), so a run killed with `kill -9` and started again sees exactly the data it
would have seen.

Four ways to serve the training split of a harvest (`--batches`):

| source | the training split lives | per step |
|---|---|---|
| `resident` | on the training device (float16, as stored) | one gather on the device, nothing on the host |
| `pinned` | in pinned host memory | a background thread gathers the next batches and copies them to the device asynchronously |
| `chunked` | on disk (larger than memory) | windows of large sequential reads, shuffled within the window, prefetched in the background |
| `memmap` | on disk | rows read from the memory-mapped shards (the simplest; slow on a GPU) |

`resident`, `pinned` and `memmap` serve the same batches (a seeded permutation per epoch,
consecutive slices, sorted within a batch); `chunked` shuffles within windows instead of
over the whole split. `auto` takes `resident` when the split fits in half the device's free
memory, else `pinned` (CUDA) when it fits in half the host's available memory, else `chunked`.
None of them does work proportional to the whole split per step: the permutation is drawn
once per epoch.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, DataError, TrainingError
from .activation_store import ActivationStore, TokenSet

SOURCES = ("auto", "resident", "pinned", "chunked", "memmap")


class BatchSource(Protocol):
    d_in: int
    """Width of the activations."""
    norm_scale: float
    """x_norm = norm_scale · x_raw gives E‖x_norm‖² = d on the training data."""
    n_tokens: int
    """Training tokens available."""

    def describe(self) -> dict:
        """What a checkpoint records about the data: model, hook, acts."""

    def batch(self, step: int) -> torch.Tensor:
        """[batch_tokens / processes, d] normalised activations for `step` (this process's
        slice of the global batch), on the training device."""


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Token indices for `step`: consecutive slices of a seeded permutation per epoch."""
    return EpochOrder(n, batch, seed).indices(step)


class EpochOrder:
    """The order tokens are seen in: a permutation seeded by (seed, epoch), cut into
    consecutive batches, each sorted (sequential reads). Drawn once per epoch."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.per_epoch = max(1, n // batch)
        self._epoch: int | None = None
        self._batches: np.ndarray | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """int64 [per_epoch, batch]: every batch of `epoch`, each sorted."""
        if epoch != self._epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._batches = np.sort(perm[: self.per_epoch * self.batch].reshape(self.per_epoch, -1), axis=1)
            self._epoch = epoch
        return self._batches

    def indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.per_epoch)
        return self.epoch_batches(epoch)[offset]


def _check(store: ActivationStore, batch_tokens: int) -> TokenSet:
    data = store.split("train")
    if data.n_tokens < batch_tokens:
        raise DataError(
            f"The training split of {store.path} has {data.n_tokens} tokens, fewer than "
            f"one batch of {batch_tokens}; harvest more tokens or lower --batch-tokens."
        )
    return data


class _FromStore:
    """What every source of a harvest folder shares. With several processes (rank of world),
    each serves its consecutive slice of every global batch."""

    def __init__(self, store: ActivationStore, batch_tokens: int, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1):
        self.store = store
        self.data = _check(store, batch_tokens)
        self.batch_tokens, self.seed, self.device = batch_tokens, seed, device
        self.rank, self.world = rank, world
        self.local = batch_tokens // world
        self.part = slice(rank * self.local, (rank + 1) * self.local)
        self.d_in = store.d_in
        self.norm_scale = store.norm_scale
        self.n_tokens = self.data.n_tokens
        self.order = EpochOrder(self.n_tokens, batch_tokens, seed)

    def describe(self) -> dict:
        return {"model": self.store.model_name, "hook": self.store.hook,
                "acts": str(Path(self.store.path).resolve())}

    def _finish(self, x: torch.Tensor, step: int) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float() * self.norm_scale
        if self.device.type == "cpu" and not torch.isfinite(x).all():  # on a GPU: at log steps
            raise TrainingError(
                f"Activations of the batch for step {step} contain NaN or inf; "
                f"re-harvest {self.store.path}."
            )
        return x


class MemmapBatches(_FromStore):
    """Rows read from the memory-mapped shards at every step."""

    def batch(self, step: int) -> torch.Tensor:
        return self._finish(torch.from_numpy(self.data.read(self.order.indices(step)[self.part])), step)


class ResidentBatches(_FromStore):
    """The whole training split on the training device; each epoch's order moves there once."""

    def __init__(self, store, batch_tokens, seed, device, rank=0, world=1):
        super().__init__(store, batch_tokens, seed, device, rank, world)
        self.x = _load_split(self.data, device)
        self._epoch: int | None = None
        self._order_dev: torch.Tensor | None = None

    def batch(self, step: int) -> torch.Tensor:
        epoch, offset = divmod(step, self.order.per_epoch)
        if epoch != self._epoch:
            self._order_dev = torch.from_numpy(self.order.epoch_batches(epoch)).to(self.device)
            self._epoch = epoch
        return self._finish(self.x[self._order_dev[offset, self.part]], step)


class PinnedBatches(_FromStore):
    """The training split in pinned host memory; a background thread gathers the next
    `depth` batches and, on CUDA, starts their copies to the device on a side stream."""

    def __init__(self, store, batch_tokens, seed, device, rank=0, world=1, depth: int = 3):
        super().__init__(store, batch_tokens, seed, device, rank, world)
        self.cuda = device.type == "cuda"
        self.x = _load_split(self.data, torch.device("cpu"), pin=self.cuda)
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._prefetch = _Prefetcher(self._make, lambda s: range(s + 1, s + depth + 1))

    def _make(self, step: int):
        rows = self.x.index_select(0, torch.from_numpy(self.order.indices(step)[self.part]))
        if not self.cuda:
            return rows
        rows = rows.pin_memory()
        with torch.cuda.stream(self._stream):
            on_device = rows.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return on_device, ready, rows  # rows stays alive until the copy is used

    def batch(self, step: int) -> torch.Tensor:
        item = self._prefetch.get(step)
        if not self.cuda:
            return self._finish(item, step)
        on_device, ready, _ = item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        on_device.record_stream(current)
        return self._finish(on_device, step)

    def close(self) -> None:
        self._prefetch.close()


class ChunkedBatches(_FromStore):
    """For splits larger than memory: the split is cut into chunks of consecutive rows; each
    epoch visits the chunks in a seeded order, `window` chunks at a time, read sequentially
    and shuffled together, the next window read in the background. Batches are consecutive
    slices of a window (a window holds whole batches), so each token is seen at most once
    per epoch."""

    def __init__(self, store, batch_tokens, seed, device, rank=0, world=1,
                 chunk_tokens: int = 1 << 16, window: int = 64):
        super().__init__(store, batch_tokens, seed, device, rank, world)
        self.chunk = max(chunk_tokens, batch_tokens)
        self.n_chunks = max(1, self.n_tokens // self.chunk)
        if self.n_chunks * self.chunk < batch_tokens:
            self.chunk = self.n_tokens
        self.window = min(window, self.n_chunks)
        n_windows = -(-self.n_chunks // self.window)
        # batches in each window of an epoch (the last window may hold fewer chunks)
        self.schedule = [min(self.window, self.n_chunks - w * self.window) * self.chunk // batch_tokens
                         for w in range(n_windows)]
        self.per_epoch = sum(self.schedule)
        self._current: tuple[tuple[int, int], torch.Tensor] | None = None
        self._prefetch = _Prefetcher(self._window_rows, lambda key: [self._next(key)])

    def _locate(self, step: int) -> tuple[tuple[int, int], int]:
        """((epoch, window), batch within the window) of a step."""
        epoch, offset = divmod(step, self.per_epoch)
        for w, n in enumerate(self.schedule):
            if offset < n:
                return (epoch, w), offset
            offset -= n
        raise AssertionError("unreachable")

    def _next(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, w = key
        return (epoch, w + 1) if w + 1 < len(self.schedule) else (epoch + 1, 0)

    def window_index(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(the window's chunks, in reading order; the order its rows are served in)."""
        epoch, w = key
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        chunks = np.sort(order[w * self.window : (w + 1) * self.window])
        shuffle = np.random.default_rng([self.seed, epoch, w]).permutation(len(chunks) * self.chunk)
        return chunks, shuffle

    def rows_of(self, step: int) -> np.ndarray:
        """Split rows of the batch of `step` (for tests and checks)."""
        key, b = self._locate(step)
        chunks, shuffle = self.window_index(key)
        rows = (chunks[:, None] * self.chunk + np.arange(self.chunk)).reshape(-1)[shuffle]
        return rows[b * self.batch_tokens : (b + 1) * self.batch_tokens][self.part]

    def _window_rows(self, key: tuple[int, int]) -> torch.Tensor:
        chunks, shuffle = self.window_index(key)
        rows = np.concatenate([self.data.slice(c * self.chunk, (c + 1) * self.chunk) for c in chunks])
        return torch.from_numpy(np.ascontiguousarray(rows[shuffle], dtype=np.float16))

    def batch(self, step: int) -> torch.Tensor:
        key, b = self._locate(step)
        if self._current is None or self._current[0] != key:
            self._current = (key, self._prefetch.get(key))
        rows = self._current[1][b * self.batch_tokens : (b + 1) * self.batch_tokens]
        return self._finish(rows[self.part], step)

    def close(self) -> None:
        self._prefetch.close()


class _Prefetcher:
    """Makes items ahead of use in one background thread: `get(k)` returns make(k) and has
    the keys `ahead(k)` made next; anything else made is dropped."""

    def __init__(self, make: Callable, ahead: Callable):
        self.make, self.ahead = make, ahead
        self._ready: dict = {}
        self._asked: set = set()
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            k = self._queue.get()
            if k is _STOP:
                return
            try:
                item = self.make(k)
            except BaseException as exc:  # handed to whoever asks for k
                item = exc
            with self._cond:
                if k in self._asked:
                    self._ready[k] = item
                self._cond.notify_all()

    def _ask(self, k) -> None:
        if k not in self._asked:
            self._asked.add(k)
            self._queue.put(k)

    def get(self, k):
        with self._cond:
            keep = [k, *self.ahead(k)]
            for j in keep:
                self._ask(j)
            for j in [j for j in self._asked if j not in keep]:
                self._asked.discard(j)
                self._ready.pop(j, None)
            while k not in self._ready:
                self._cond.wait()
            item = self._ready.pop(k)
            self._asked.discard(k)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._queue.put(_STOP)


_STOP = object()


def _load_split(data: TokenSet, device: torch.device, pin: bool = False) -> torch.Tensor:
    """The whole split as one float16 tensor on `device`: each shard read in large pieces
    in its stored dtype (no round trip through float32) by a few threads at once — numpy's
    and torch's copies release the GIL, so reading and copying to the device overlap."""
    out = torch.empty((data.n_tokens, data.d), dtype=torch.float16,
                      device=device if device.type == "cuda" else "cpu",
                      pin_memory=pin and device.type != "cuda")

    def copy(piece: tuple[int, np.ndarray]) -> None:
        start, rows = piece
        out[start : start + len(rows)].copy_(torch.from_numpy(np.array(rows)))

    with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="load") as pool:
        list(pool.map(copy, data.raw_pieces(1 << 16)))  # waits for every piece, raises its errors
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def choose_source(n_tokens: int, d: int, device: torch.device, asked: str = "auto") -> str:
    """Which source `auto` means for a split of n_tokens × d float16 on `device`."""
    if asked != "auto":
        return asked
    need = n_tokens * d * 2
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need < free // 2:
            return "resident"
        return "pinned" if need < _available_host_bytes() // 2 else "chunked"
    return "resident" if need < _available_host_bytes() // 2 else "chunked"


def harvest_batches(store: ActivationStore, batch_tokens: int, seed: int, device: torch.device,
                    source: str = "auto", rank: int = 0, world: int = 1) -> BatchSource:
    """The batch source `source` (or the one `auto` picks) over a harvest folder's train split."""
    if source not in SOURCES:
        raise ConfigError(f"Unknown batch source '{source}'; choose one of {', '.join(SOURCES)}.")
    data = _check(store, batch_tokens)
    kind = choose_source(data.n_tokens, store.d_in, device, source)
    if kind == "resident" and device.type == "cuda":
        need = data.n_tokens * store.d_in * 2
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise ConfigError(
                f"The training split ({need / 2**30:.1f} GiB in float16) does not fit in the "
                f"{free / 2**30:.1f} GiB free on {device}; use --batches pinned or chunked."
            )
    cls = {"resident": ResidentBatches, "pinned": PinnedBatches, "chunked": ChunkedBatches,
           "memmap": MemmapBatches}[kind]
    return cls(store, batch_tokens, seed, device, rank, world)
