"""`moesae build`: harvest → train → eval → analyze from one TOML config, every step cached.

A build file is flat: every key is the name of an option of the harvest, of training (the
defaults of every SAE), of evaluation or of the analysis (engine.options), plus `db` and one
`[[sae]]` table per SAE (a unique `name` and any `moesae train` option). `docs/demo.toml` is
the offline demo and what `moesae build` and `moesae demo` run without --config.

Each step's output folder is named by a hash of exactly the inputs that determine it, so a
second `build` finds everything in place and only reports, and changing one SAE retrains
only that SAE. The DuckDB file records the hash of everything it was built from; when that
matches, analysis is skipped too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .analysis.config import AnalysisConfig
from .data.harvest import HarvestConfig
from .errors import ConfigError, DataError
from .metrics.evaluate import EvalConfig
from .options import names, set_flat
from .paths import REPO_ROOT, atomic_write_json, data_dir
from .training.config import TrainConfig
from .training.run_folder import RunFolder

DEMO_CONFIG = REPO_ROOT / "docs" / "demo.toml"
"""The offline demo's build file."""
COMPUTED = ("out", "acts")
"""Options a build sets itself (where each step writes and reads)."""
DEFAULT_SAES = [
    {"name": "topk", "arch": "topk"},
    {"name": "switch", "arch": "switch"},
    {"name": "scale-e2", "arch": "scale", "active": 2},
]


@dataclass
class BuildConfig:
    """Everything one build needs; each part's defaults are that part's own."""

    db: str | None = None
    """The DuckDB file to write (default: <data dir>/demo.duckdb; caches go beside it)."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    """What every SAE is trained with unless its [[sae]] table says otherwise."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    saes: list[dict] = field(default_factory=lambda: [dict(s) for s in DEFAULT_SAES])
    """One table per SAE ([[sae]] in TOML): a unique `name` plus any `moesae train` option."""

    @classmethod
    def load(cls, path: str | Path | None) -> BuildConfig:
        """The build described by a TOML file; None means the offline demo."""
        p = Path(path) if path is not None else DEMO_CONFIG
        if not p.exists():
            raise ConfigError(
                f"Config file {p} does not exist."
                if path is not None else
                f"The demo configuration {p} is missing; pass a build file with --config."
            )
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {p} is not valid TOML ({exc}).") from None
        known = names(cls) - set(COMPUTED)
        unknown = sorted(set(raw) - known - {"sae"})
        if unknown:
            raise ConfigError(
                f"Unknown key(s) in {p}: {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        saes = raw.pop("sae", None)
        cfg = set_flat(cls(), raw, where=str(p))
        if saes is not None:
            cfg.saes = saes
        sae_keys = names(TrainConfig) - set(COMPUTED)
        seen = set()
        for s in cfg.saes:
            name = s.get("name")
            if not name or name in seen:
                raise ConfigError("Every [[sae]] table needs a unique `name`.")
            seen.add(name)
            bad = sorted(set(s) - sae_keys - {"name"})
            if bad:
                raise ConfigError(f"Unknown key(s) in [[sae]] '{name}': {', '.join(bad)}.")
        return cfg

    def train_config(self, spec: dict) -> TrainConfig:
        """The TrainConfig of one [[sae]] table: the build's training defaults, then its keys."""
        spec = {k: v for k, v in spec.items() if k != "name"}
        return set_flat(copy.deepcopy(self.train), spec, where=f"[[sae]] '{spec.get('name', '')}'")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build(cfg: BuildConfig, progress: bool = True, log=print) -> Path:
    """Run every step that is not cached; return the DuckDB path."""
    from .analysis.pipeline import analyze
    from .data.activation_store import ActivationStore
    from .data.harvest import harvest
    from .models import LazyModel
    from .training.trainer import train

    cfg = copy.deepcopy(cfg)
    cfg.db = str(Path(cfg.db) if cfg.db else data_dir() / "demo.duckdb")
    db = Path(cfg.db)
    root = db.parent  # caches live beside the DB file: acts/<hash>, runs/<name>-<hash>
    t0 = time.perf_counter()

    h_identity = {k: v for k, v in asdict(cfg.harvest).items() if k != "out"}
    cfg.harvest.out = str(root / "acts" / _hash(h_identity))
    try:
        acts = ActivationStore(cfg.harvest.out)
        log(f"[1/4] harvest   cached: {cfg.harvest.out}")
    except DataError:  # missing or unfinished: harvest (resumes from complete shards)
        log(f"[1/4] harvest   running: {cfg.harvest.out}")
        acts = harvest(cfg.harvest, progress=progress)

    runs: list[tuple[str, RunFolder]] = []
    for spec in cfg.saes:
        name = spec["name"]
        tc = cfg.train_config(spec)
        tc.acts = cfg.harvest.out
        tc.out = str(root / "runs" / f"{name}-{_hash(tc.identity())}")
        run = RunFolder(tc.out)
        log(f"[2/4] train     {name:<12} {'cached' if run.is_finished() else 'running'}: {tc.out}")
        train(tc, progress=progress)
        runs.append((name, run))

    model = LazyModel(cfg.harvest.model)
    metrics: dict[str, dict] = {}
    loaded = []
    for name, run in runs:
        sae, meta = load_run(run)
        metrics[name] = evaluate_cached(run, sae, acts, model, cfg.eval, progress,
                                        lambda state, n=name: log(f"[3/4] eval      {n:<12} {state}"))
        loaded.append((name, sae, meta))

    build_hash = _hash([asdict(cfg), [str(r.path) for _, r in runs], h_identity])
    if _db_build_hash(db) == build_hash:
        log(f"[4/4] analyze   cached: {db}")
    else:
        log(f"[4/4] analyze   running → {db}")
        analyze(loaded, acts, model.get(), db, cfg.analysis, metrics=metrics,
                training_logs={name: run.read_log() for name, run in runs},
                build_hash=build_hash, progress=progress)
    log(f"build finished in {time.perf_counter() - t0:.1f} s: {db}")
    return db


def load_run(run: RunFolder):
    """(sae, meta) of a run folder's final SAE, meta recording where the checkpoint lives."""
    from .formats import load_sae

    sae, meta = load_sae(run.final)
    return sae, dict(meta, checkpoint=str(run.final.resolve()), run=str(run.path.resolve()))


def evaluate_cached(run: RunFolder, sae, acts, model, cfg: EvalConfig, progress: bool,
                    report=lambda state: None) -> dict:
    """METHOD §4 metrics of a run on an activation folder, cached in the run folder."""
    from .metrics.evaluate import evaluate

    cache = run.metrics_cache(_hash([str(Path(acts.path).resolve()), cfg.eval_tokens, cfg.ce_contexts,
                                     cfg.dead_eval_tokens]))
    if cache.exists():
        report("cached")
        return json.loads(cache.read_text())
    report("running")
    lm = model.get()
    metrics = evaluate(sae, acts, lm if lm.has_lm_head else None, cfg, progress=progress)
    atomic_write_json(cache, metrics, indent=None)
    return metrics


def _db_build_hash(db: Path) -> str | None:
    if not db.exists():
        return None
    from .store import open_db

    try:
        with open_db(db) as store:
            return store.build_hash()
    except Exception:  # an unreadable or older file is simply rebuilt
        return None
