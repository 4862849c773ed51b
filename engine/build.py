"""`moesae build`: harvest → train → eval → analyze from one TOML config, every step cached.

Each step's output folder is named by a hash of exactly the inputs that determine it, so a
second `build` finds everything in place and only reports, and changing one SAE retrains
only that SAE. The DuckDB file records the hash of everything it was built from; when that
matches, analysis is skipped too.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError, DataError
from .paths import atomic_write, data_dir

DEFAULT_SAES = [
    {"name": "topk", "arch": "topk"},
    {"name": "switch", "arch": "switch"},
    {"name": "scale-e2", "arch": "scale", "active": 2},
]


@dataclass
class BuildConfig:
    """Everything one build needs. Defaults are the offline demo (see README)."""

    db: str | None = None
    """The DuckDB file to write (default: <data dir>/demo.duckdb; caches go beside it)."""
    model: str | None = None
    """Model name (default: the offline SmolLM2-135M-Instruct)."""
    hook: str | None = None
    """TransformerLens hook (default: the middle layer's residual stream)."""
    corpus: str | None = None
    """Comma-separated sources: pydoc, fortunes, bible, a .txt/.jsonl path, hf:NAME (default: every built-in domain available)."""
    tokens: int = 120_000
    """Tokens to harvest (train + eval)."""
    context_len: int = 128
    """Tokens per context, BOS included."""
    seed: int = 0
    """Seed for the corpus order, the split, initialisation and batches."""
    eval_fraction: float = 0.1
    """Fraction of contexts held out for evaluation and analysis."""
    width: int = 4608
    """M for every SAE unless its [[sae]] table says otherwise (8 × d_model for SmolLM2)."""
    experts: int = 16
    """N for the MoE SAEs."""
    k: int = 32
    """Global TopK."""
    steps: int = 600
    """Training steps per SAE."""
    batch_tokens: int = 2048
    """Tokens per training step."""
    lb_weight: float | None = None
    """Load-balancing weight α (default 0.01·d)."""
    eval_tokens: int = 50_000
    """Held-out tokens for the METHOD §4 reconstruction metrics."""
    ce_contexts: int = 16
    """Held-out contexts for CE loss recovered and KL (three model passes each)."""
    analysis_contexts: int = 300
    """Held-out contexts the analysis pass reads (examples come from these)."""
    saes: list[dict] = field(default_factory=lambda: [dict(s) for s in DEFAULT_SAES])
    """One table per SAE ([[sae]] in TOML): a unique `name` plus any `moesae train` option."""

    @classmethod
    def load(cls, path: str | Path | None) -> BuildConfig:
        if path is None:
            return cls()
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"Config file {p} does not exist.")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {p} is not valid TOML ({exc}).") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"sae"})
        if unknown:
            raise ConfigError(f"Unknown key(s) in {p}: {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        saes = raw.pop("sae", None) or raw.pop("saes", None)
        cfg = cls(**raw)
        if saes is not None:
            cfg.saes = saes
        names = [s.get("name") for s in cfg.saes]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError("Every [[sae]] table needs a unique `name`.")
        return cfg


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_root(db: Path) -> Path:
    """Caches live beside the DB file: <dir>/acts/<hash>, <dir>/runs/<name>-<hash>."""
    return db.parent


def build(cfg: BuildConfig, progress: bool = True, log=print) -> Path:
    """Run every step that is not cached; return the DuckDB path."""
    from .activations import ActivationStore, HarvestConfig, harvest
    from .analyze import analyze
    from .models import DEFAULT_MODEL
    from .train import TrainConfig, train

    # Spelled-out defaults hash like omitted ones (docs/demo.toml == no config at all).
    cfg = replace(cfg, model=cfg.model or DEFAULT_MODEL,
                  db=str(Path(cfg.db) if cfg.db else data_dir() / "demo.duckdb"))
    db = Path(cfg.db)
    root = data_root(db)
    t0 = time.perf_counter()

    hcfg = HarvestConfig(
        model=cfg.model,
        hook=cfg.hook,
        corpus=cfg.corpus,
        tokens=cfg.tokens,
        context_len=cfg.context_len,
        seed=cfg.seed,
        eval_fraction=cfg.eval_fraction,
    )
    h_identity = {k: v for k, v in asdict(hcfg).items() if k != "out"}
    hcfg.out = str(root / "acts" / _hash(h_identity))
    try:
        acts = ActivationStore(hcfg.out)
        log(f"[1/4] harvest   cached: {hcfg.out}")
    except DataError:  # missing or unfinished: harvest (resumes from complete shards)
        log(f"[1/4] harvest   running: {hcfg.out}")
        acts = harvest(hcfg, progress=progress)

    runs = []
    for spec in cfg.saes:
        spec = dict(spec)
        name = spec.pop("name")
        tc = TrainConfig(
            acts=hcfg.out,
            width=cfg.width,
            experts=cfg.experts,
            k=cfg.k,
            steps=cfg.steps,
            batch_tokens=cfg.batch_tokens,
            lb_weight=cfg.lb_weight,
            seed=cfg.seed,
        )
        known = {f.name for f in fields(TrainConfig)}
        bad = sorted(set(spec) - known)
        if bad:
            raise ConfigError(f"Unknown key(s) in [[sae]] '{name}': {', '.join(bad)}.")
        for key, val in spec.items():
            setattr(tc, key, val)
        tc.out = str(root / "runs" / f"{name}-{_hash(tc.identity())}")
        done = (Path(tc.out) / "final" / "cfg.json").exists()
        log(f"[2/4] train     {name:<12} {'cached' if done else 'running'}: {tc.out}")
        train(tc, progress=progress)
        runs.append((name, Path(tc.out)))

    model = LazyModel(hcfg.model)
    metrics: dict[str, dict] = {}
    loaded = []
    for name, run in runs:
        sae, meta = load_run(run)
        metrics[name] = evaluate_cached(run, sae, acts, model, cfg.eval_tokens, progress,
                                        cfg.ce_contexts,
                                        lambda state, n=name: log(f"[3/4] eval      {n:<12} {state}"))
        loaded.append((name, sae, meta))

    build_hash = _hash([asdict(cfg), [str(r) for _, r in runs], h_identity])
    if _db_build_hash(db) == build_hash:
        log(f"[4/4] analyze   cached: {db}")
    else:
        log(f"[4/4] analyze   running → {db}")
        logs = {name: read_log(run) for name, run in runs}
        analyze(
            loaded,
            acts,
            model.get(),
            db,
            n_contexts=cfg.analysis_contexts,
            metrics=metrics,
            training_logs=logs,
            build_hash=build_hash,
            progress=progress,
        )
    log(f"build finished in {time.perf_counter() - t0:.1f} s: {db}")
    return db


class LazyModel:
    """Load the model only if some step needs it (a cached build never does)."""

    def __init__(self, name: str):
        self.name, self._model = name, None

    def get(self):
        if self._model is None:
            from .models import load_model

            self._model = load_model(self.name)
        return self._model


def load_run(run: Path):
    """(sae, meta) of a run folder's final SAE, meta recording where the checkpoint lives."""
    from .checkpoint import load_sae

    sae, meta = load_sae(run / "final")
    return sae, dict(meta, checkpoint=str((run / "final").resolve()), run=str(run.resolve()))


def evaluate_cached(run: Path, sae, acts, model: LazyModel, eval_tokens: int, progress: bool,
                    ce_contexts: int = 64, report=lambda state: None) -> dict:
    """METHOD §4 metrics of a run on an activation folder, cached in the run folder."""
    from .evaluate import evaluate

    cache = run / f"metrics-{_hash([str(Path(acts.path).resolve()), eval_tokens, ce_contexts])}.json"
    if cache.exists():
        report("cached")
        return json.loads(cache.read_text())
    report("running")
    lm = model.get()
    metrics = evaluate(sae, acts, lm if lm.has_lm_head else None, max_tokens=eval_tokens,
                       ce_contexts=ce_contexts, progress=progress)
    atomic_write(cache, lambda f: json.dump(metrics, f))
    return metrics


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _db_build_hash(db: Path) -> str | None:
    if not db.exists():
        return None
    from .store import open_db

    try:
        return open_db(db).build_hash()
    except Exception:  # an unreadable or older file is simply rebuilt
        return None
