"""Harvest activations at one hook into memory-mapped shards on disk, resumably.

Folder layout (`out`):
    manifest.json            config, shard list (updated after every shard), norm_scale at the end
    contexts.npy             int32 [n_ctx, L] token ids, BOS first
    contexts.json            {"domains": [...], "split": ["train"|"eval", ...]} per context
    {split}-{k:05d}.npy      float16/float32 [n, d] activations (raw units)
    {split}-{k:05d}.idx.npy  int32 [n, 2] (context id, position) of each row
    {split}-{k:05d}.norms.npy float32 norms of every position seen (incl. dropped), so a resumed
                             run rebuilds the outlier filter's running median exactly

Each file is written to a temporary name and renamed; a shard counts only once the manifest
lists it. A killed harvest therefore resumes from its last complete shard when run again with
the same config. Splits are by context, so eval tokens never share a context with train ones.
"""

from __future__ import annotations

import errno
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.errors import ConfigError, DataError
from engine.models import DEFAULT_MODEL, LoadedModel, load_model
from engine.paths import atomic_write, data_dir

FORMAT_VERSION = 1
OUTLIER_FACTOR = 10.0
"""Tokens whose norm exceeds this multiple of the running median are dropped (METHOD.md §3)."""
MEDIAN_WINDOW = 65_536
"""How many recent token norms the running median looks at."""
SPLITS = ("train", "eval")


@dataclass
class HarvestConfig:
    model: str = field(
        default=DEFAULT_MODEL, metadata={"help": "model name, local HF folder or hub name"}
    )
    hook: str | None = field(
        default=None,
        metadata={"help": "TransformerLens hook name (default: middle-layer residual stream)"},
    )
    corpus: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated sources: pydoc, fortunes, bible, a .txt/.jsonl path, hf:NAME[:split] (default: every built-in domain available)"
        },
    )
    tokens: int = field(
        default=200_000, metadata={"help": "number of tokens to harvest (train + eval)"}
    )
    context_len: int = field(default=128, metadata={"help": "tokens per context, BOS included"})
    seed: int = field(
        default=0, metadata={"help": "seed for document order, context shuffling and the split"}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "fraction of contexts held out for evaluation"}
    )
    batch_contexts: int = field(default=8, metadata={"help": "contexts per forward pass"})
    dtype: str = field(default="float16", metadata={"help": "storage dtype: float16 or float32"})
    drop_outliers: bool = field(
        default=True, metadata={"help": "drop tokens whose norm is > 10x the running median"}
    )
    out: str | None = field(
        default=None, metadata={"help": "output folder (default: data/acts/<name from the config>)"}
    )
    shard_mb: float = field(
        default=64.0, metadata={"help": "approximate size of one shard file in MB"}
    )


def default_out(cfg: HarvestConfig, hook: str) -> Path:
    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")

    name = f"{slug(cfg.model)}__{slug(hook)}__{slug(cfg.corpus or 'mix')}__{cfg.tokens}t-L{cfg.context_len}-s{cfg.seed}"
    return data_dir() / "acts" / name


def _check(cfg: HarvestConfig) -> None:
    if cfg.tokens < 1:
        raise ConfigError(f"tokens must be positive, got {cfg.tokens}.")
    if cfg.context_len < 2:
        raise ConfigError(f"context_len must be at least 2, got {cfg.context_len}.")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}.")
    if cfg.batch_contexts < 1:
        raise ConfigError(f"batch_contexts must be positive, got {cfg.batch_contexts}.")
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


def _save_npy(path: Path, arr: np.ndarray) -> None:
    try:
        atomic_write(path, lambda f: np.save(f, arr), binary=True)
    except OSError as e:
        raise _write_error(path, e) from e


def _write_error(path: Path, e: OSError) -> DataError:
    if e.errno == errno.ENOSPC:
        return DataError(
            f"The disk filled up while writing {path}; free some space and run the same "
            "harvest again to resume from the last complete shard."
        )
    return DataError(f"Could not write {path} ({e.strerror or e}).")


def _read_manifest(folder: Path) -> dict:
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


def _open_shard(folder: Path, shard: dict, d: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
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


# ---- harvest ---------------------------------------------------------------------------


def _identity(cfg: HarvestConfig, lm: LoadedModel, hook: str) -> dict:
    """What must match for a folder to be resumed (everything but the folder itself)."""
    ident = asdict(cfg)
    ident.pop("out")
    ident.update(hook=hook, model=lm.name, format=FORMAT_VERSION)
    if cfg.corpus is None:
        from engine.corpus import available_sources

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


def _prepare_contexts(
    cfg: HarvestConfig, lm: LoadedModel, out: Path
) -> tuple[np.ndarray, list[str], list[str]]:
    tok_path, meta_path = out / "contexts.npy", out / "contexts.json"
    # Saved contexts are trusted only once a manifest vouches for the config they came from.
    if (out / "manifest.json").exists() and tok_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return np.load(tok_path), meta["domains"], meta["split"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"The contexts saved in {out} are corrupt; delete the folder and harvest again."
            ) from e
    from engine.corpus import load_corpus, make_contexts

    contexts = make_contexts(
        lm, load_corpus(cfg.corpus), context_len=cfg.context_len, n_tokens=cfg.tokens, seed=cfg.seed
    )
    n_ctx = len(contexts)
    n_eval = min(n_ctx - 1, round(n_ctx * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    if cfg.eval_fraction > 0 and n_ctx > 1:
        n_eval = max(1, n_eval)
    split = ["train"] * (n_ctx - n_eval) + ["eval"] * n_eval  # contexts are already shuffled
    _save_npy(tok_path, contexts.tokens)
    _write_json(meta_path, {"domains": contexts.domains, "split": split})
    return contexts.tokens, contexts.domains, split


def harvest(
    cfg: HarvestConfig,
    progress: bool = True,
    *,
    model: LoadedModel | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> ActivationStore:
    """Run the model over the corpus and store activations at cfg.hook; resumes a folder
    harvested with the same config, refuses one harvested with another.
    `model`: an already loaded model named cfg.model (saves a reload); `on_shard(n_done)`:
    called after each committed shard (tests use it to simulate a crash)."""
    _check(cfg)
    if model is not None and model.name != cfg.model:
        raise ConfigError(f"harvest was given model {model.name} but the config names {cfg.model}.")
    lm = model or load_model(cfg.model)
    hook = lm.resolve_hook(cfg.hook)
    out = Path(cfg.out).expanduser() if cfg.out else default_out(cfg, hook)
    identity = _identity(cfg, lm, hook)
    d, dtype = lm.d_model, cfg.dtype
    first_pos = 1 if lm.bos_token_id is not None else 0

    if (out / "manifest.json").exists():
        manifest = _read_manifest(out)
        if manifest["config"] != identity:
            diff = [k for k in identity if manifest["config"].get(k) != identity[k]]
            raise DataError(
                f"The folder {out} holds a harvest with a different configuration "
                f"({', '.join(diff) or 'format'}); choose another output folder or delete it."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = None

    tokens, domains, split = _prepare_contexts(cfg, lm, out)
    body = tokens.shape[1] - first_pos
    itemsize = np.dtype(dtype).itemsize
    per_shard = max(1, int(cfg.shard_mb * 2**20 // (body * d * itemsize)))
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
        try:
            _open_shard(out, entry, d, dtype)
            np.load(out / f"{entry['file']}.norms.npy", mmap_mode="r")
        except (DataError, OSError, ValueError):
            break
        done.append(entry)
    if done == manifest["shards"] and manifest.get("complete") and len(done) == len(plan):
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
    try:
        for planned in plan[len(done) :]:
            rows, index, norms_seen = [], [], []
            dropped = 0
            lo, hi = planned["contexts"]
            for start in range(lo, hi, cfg.batch_contexts):
                stop = min(start + cfg.batch_contexts, hi)
                x = lm.activations(torch.from_numpy(tokens[start:stop].astype(np.int64)), hook)
                if not torch.isfinite(x).all():
                    raise DataError(
                        f"Model {lm.name} produced NaN or infinite activations at {hook} "
                        f"(contexts {start}-{stop - 1}); check the model weights and dtype."
                    )
                x = x[:, first_pos:, :].reshape(-1, d).float().cpu().numpy()
                norms = np.linalg.norm(x, axis=1).astype(np.float32)
                keep = np.ones(len(x), dtype=bool)
                if cfg.drop_outliers:
                    median = float(np.median(np.concatenate([history, norms])))
                    keep = norms <= OUTLIER_FACTOR * median
                    dropped += int((~keep).sum())
                history = np.concatenate([history, norms])[-MEDIAN_WINDOW:]
                stored = x[keep].astype(dtype)
                if not np.isfinite(stored).all():
                    raise DataError(
                        f"Activations at {hook} overflow {dtype}; harvest again with dtype float32."
                    )
                ctx = np.repeat(np.arange(start, stop, dtype=np.int32), body)
                pos = np.tile(np.arange(first_pos, first_pos + body, dtype=np.int32), stop - start)
                rows.append(stored)
                index.append(np.stack([ctx, pos], axis=1)[keep])
                norms_seen.append(norms)
                bar.update((stop - start) * body)
            acts = np.concatenate(rows)
            name = planned["file"]
            _save_npy(out / f"{name}.norms.npy", np.concatenate(norms_seen))
            _save_npy(out / f"{name}.idx.npy", np.concatenate(index))
            _save_npy(out / f"{name}.npy", acts)
            sum_sq = float(np.square(acts, dtype=np.float64).sum())
            manifest["shards"].append(
                {**planned, "n_tokens": int(len(acts)), "dropped": dropped, "sum_sq": sum_sq}
            )
            _write_json(out / "manifest.json", manifest)
            if on_shard is not None:
                on_shard(len(manifest["shards"]))
    finally:
        bar.close()

    train = [s for s in manifest["shards"] if s["split"] == "train"]
    n_train = sum(s["n_tokens"] for s in train)
    if n_train == 0:
        raise DataError(f"No training tokens were kept in {out}; harvest more tokens.")
    mean_sq = sum(s["sum_sq"] for s in train) / n_train
    manifest.update(
        complete=True,
        norm_scale=math.sqrt(d / mean_sq),
        n_tokens={
            name: sum(s["n_tokens"] for s in manifest["shards"] if s["split"] == name)
            for name in SPLITS
        },
        dropped_outliers=sum(s["dropped"] for s in manifest["shards"]),
    )
    _write_json(out / "manifest.json", manifest)
    return ActivationStore(out)


# ---- reading ---------------------------------------------------------------------------


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

    def iter_chunks(self, n: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 [≤n, d]) over the whole split, in order."""
        for start in range(0, self.n_tokens, n):
            yield start, self.slice(start, start + n)


class ActivationStore:
    """A finished harvest folder: manifest, contexts and memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
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
                _open_shard(self.path, s, self.d_in, self.dtype)
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
