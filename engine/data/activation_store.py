"""A finished activation harvest, read back: manifest, contexts and memory-mapped shards.

Folder layout (written by `engine.data.harvest`):
    manifest.json            config, shard list (updated after every shard), norm_scale at the end
    contexts.npy             int32 [n_ctx, L] token ids, BOS first
    contexts.json            {"domains": [...], "split": ["train"|"eval", ...]} per context
    {split}-{k:05d}.npy      float16/float32 [n, d] activations (raw units)
    {split}-{k:05d}.idx.npy  int32 [n, 2] (context id, position) of each row
    {split}-{k:05d}.norms.npy float32 norms of every position seen (incl. dropped), so a resumed
                             run rebuilds the outlier filter's running median exactly

Dropped positions (BOS/padding/outliers) simply do not appear in the shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, DataError

FORMAT_VERSION = 1
SPLITS = ("train", "eval")


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.exists():
        raise DataError(f"No activation harvest in {folder} (manifest.json is missing).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["shards"], manifest["config"]  # noqa: B018 - required keys
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"The manifest {path} is corrupt; delete the folder and harvest again."
        ) from e
    return manifest


def open_shard(folder: Path, shard: dict, d: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The memory-mapped activations and index of one shard; DataError when missing/corrupt."""
    name = shard["file"]
    try:
        acts = np.load(folder / f"{name}.npy", mmap_mode="r")
        idx = np.load(folder / f"{name}.idx.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(
            f"Activation shard {name} in {folder} is missing or corrupt; run the same harvest "
            "again to rebuild it."
        ) from e
    n = shard["n_tokens"]
    if acts.shape != (n, d) or acts.dtype != np.dtype(dtype) or idx.shape != (n, 2):
        raise DataError(
            f"Activation shard {name} in {folder} does not match its manifest entry; run the "
            "same harvest again to rebuild it."
        )
    return acts, idx



class StoredContexts(NamedTuple):
    tokens: np.ndarray
    """int32 [n_ctx, L] token ids, BOS first."""
    domains: list[str]
    """The domain of each context."""
    split: list[str]
    """'train' or 'eval' for each context."""


class TokenSet:
    """The kept tokens of one split, in harvest order, read from memory-mapped shards."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray]], d: int):
        self._acts = [a for a, _ in shards]
        self.d = d
        self._offsets = np.cumsum([0] + [len(a) for a in self._acts])
        self.n_tokens = int(self._offsets[-1])
        """Number of tokens (rows) in this split."""
        self.context_ids = np.concatenate(
            [np.zeros(0, np.int64)] + [np.asarray(i[:, 0], np.int64) for _, i in shards]
        )
        """int64 [n]: row → context id (index into `ActivationStore.contexts().tokens`)."""
        self.positions = np.concatenate(
            [np.zeros(0, np.int64)] + [np.asarray(i[:, 1], np.int64) for _, i in shards]
        )
        """int64 [n]: row → position inside its context."""

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, idx: np.ndarray) -> np.ndarray:
        """float32 [len(idx), d] raw activations of the given rows, in the order asked."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"token index out of range [0, {self.n_tokens})")
        out = np.empty((len(idx), self.d), dtype=np.float32)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = idx[where] - self._offsets[s]
            order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
            out[where[order]] = self._acts[s][local[order]]
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, d]: consecutive rows, possibly spanning shards."""
        start, stop = max(0, start), min(stop, self.n_tokens)
        parts = []
        for s, acts in enumerate(self._acts):
            lo, hi = self._offsets[s], self._offsets[s + 1]
            if hi <= start or lo >= stop:
                continue
            parts.append(acts[max(start, lo) - lo : min(stop, hi) - lo])
        if not parts:
            return np.zeros((0, self.d), np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def raw_pieces(self, n: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, [≤n, d] in the stored dtype): the split as views of its shards, none
        spanning two, with no conversion — for copying the whole split somewhere at once."""
        for s, acts in enumerate(self._acts):
            for a in range(0, len(acts), n):
                yield int(self._offsets[s]) + a, acts[a : a + n]

    def iter_chunks(self, n: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 [≤n, d]) over the whole split, in order."""
        for start in range(0, self.n_tokens, n):
            yield start, self.slice(start, start + n)


class ActivationStore:
    """A finished harvest folder: manifest, contexts and memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise DataError(
                f"The harvest in {self.path} is incomplete; run the same harvest again to finish it."
            )
        m = self.manifest
        self.model_name: str = m["model_name"]
        self.hook: str = m["hook"]
        self.d_in: int = int(m["d_in"])
        self.dtype: str = m["dtype"]
        self.context_len: int = int(m["context_len"])
        self.norm_scale: float = float(m["norm_scale"])
        """x_norm = norm_scale * x_raw gives E‖x_norm‖² = d_in on the train split."""
        self._opened = {
            name: [
                open_shard(self.path, s, self.d_in, self.dtype)
                for s in m["shards"]
                if s["split"] == name
            ]
            for name in SPLITS
        }
        self._splits: dict[str, TokenSet] = {}

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, hook={self.hook!r}, tokens={self.manifest.get('n_tokens')})"

    def contexts(self) -> StoredContexts:
        try:
            tokens = np.load(self.path / "contexts.npy", mmap_mode="r")
            meta = json.loads((self.path / "contexts.json").read_text(encoding="utf-8"))
            return StoredContexts(
                np.asarray(tokens, dtype=np.int32), meta["domains"], meta["split"]
            )
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"The contexts in {self.path} are missing or corrupt; harvest again."
            ) from e

    def split(self, name: str) -> TokenSet:
        if name not in SPLITS:
            raise ConfigError(f"Unknown split '{name}'; use train or eval.")
        if name not in self._splits:
            self._splits[name] = TokenSet(self._opened[name], self.d_in)
        return self._splits[name]
