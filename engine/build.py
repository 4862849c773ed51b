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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .analysis.config import AnalysisConfig
from .data.harvest import HarvestConfig
from .errors import ConfigError, DataError
from .metrics.evaluate import EvalConfig
from .options import names, set_flat, to_flat
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
    stream: bool = False
    """Train straight from the model (no harvest on disk): one pass of the model feeds every SAE."""
    max_cpu_hours: float = 4.0
    """On a CPU, refuse a build whose training would take longer than this (measured, not guessed)."""
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
        sae_keys = names(TrainConfig) - set(COMPUTED) | {"stream"}
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
        spec = {k: v for k, v in spec.items() if k not in ("name", "stream")}
        return set_flat(copy.deepcopy(self.train), spec, where=f"[[sae]] '{spec.get('name', '')}'")


def check_cpu_budget(tcs: list[TrainConfig], max_hours: float, log=print) -> None:
    """On a CPU, a build far larger than the demo is timed before it starts: one step of each
    SAE, on random activations of the model's width. ConfigError (one sentence) when the whole
    training would take longer than `max_hours`."""
    import time

    import torch

    from .runtime import resolve_device
    from .sae import build_sae
    from .training.schedule import make_adam, optimiser_step

    if not tcs or resolve_device(tcs[0].runtime.device).type != "cpu":
        return
    work = sum(tc.steps * tc.batch_tokens * tc.sae.width for tc in tcs)
    if work < 5e11:  # the demo is ~1e10: nothing to time
        return
    d = 576  # the default model's width; a step's cost does not depend on the data
    seconds = 0.0
    for tc in tcs:
        sae = build_sae(replace(tc.sae, d_in=d))
        opt = make_adam(sae.parameters(), 1e-4)
        x = torch.randn(tc.batch_tokens, d)
        t = time.perf_counter()
        for _ in range(2):
            out = sae(x)
            opt.zero_grad()
            (out.mse + out.lb_loss).backward()
            optimiser_step(sae, opt, 1.0)  # as the trainer's step
        seconds += (time.perf_counter() - t) / 2 * tc.steps
    hours = seconds / 3600
    log(f"[0/4] budget    about {hours:.1f} h of training on this CPU (measured)")
    if hours > max_hours:
        raise ConfigError(
            f"This build would train for about {hours:.0f} hours on this CPU (measured: one step "
            f"of each SAE), more than max_cpu_hours = {max_hours:g}; run it on a GPU, or run "
            "docs/paper-cpu.toml, its scaled-down version."
        )


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build(cfg: BuildConfig, progress: bool = True, log=print) -> Path:
    """Run every step that is not cached; return the DuckDB path."""
    from .analysis.pipeline import analyze
    from .data.activation_store import ActivationStore
    from .data.harvest import harvest
    from .models import LazyModel
    from .training.trainer import train_many

    cfg = copy.deepcopy(cfg)
    cfg.db = str(Path(cfg.db) if cfg.db else data_dir() / "demo.duckdb")
    db = Path(cfg.db)
    root = db.parent  # caches live beside the DB file: acts/<hash>, runs/<name>-<hash>
    t0 = time.perf_counter()

    h_identity = {k: v for k, v in to_flat(cfg.harvest).items() if k not in ("out", "device")}
    tcs: list[tuple[str, TrainConfig]] = []
    streamed: set[str] = set()
    for spec in cfg.saes:
        tc = cfg.train_config(spec)
        if spec.get("stream", cfg.stream):
            tc.source = copy.deepcopy(cfg.harvest.source)
            streamed.add(spec["name"])
        tcs.append((spec["name"], tc))
    check_cpu_budget([tc for _, tc in tcs], cfg.max_cpu_hours, log)

    stream_dir = root / "streams" / _hash(h_identity)
    if len(streamed) == len(tcs):
        log(f"[1/4] harvest   none: training streams from the model ({stream_dir})")
    else:
        cfg.harvest.out = str(root / "acts" / _hash(h_identity))
        try:
            acts = ActivationStore(cfg.harvest.out)
            log(f"[1/4] harvest   cached: {cfg.harvest.out}")
        except DataError:  # missing or unfinished: harvest (resumes from complete shards)
            log(f"[1/4] harvest   running: {cfg.harvest.out}")
            acts = harvest(cfg.harvest, progress=progress)

    runs: list[tuple[str, RunFolder]] = []
    for name, tc in tcs:
        tc.acts = "" if name in streamed else cfg.harvest.out
        tc.out = str(root / "runs" / f"{name}-{_hash(tc.identity())}")
        run = RunFolder(tc.out)
        log(f"[2/4] train     {name:<12} {'cached' if run.is_finished() else 'running'}: {tc.out}")
        runs.append((name, run))
    # SAEs that share their batches train together: one pass over the data (or the model) for all
    groups: dict[tuple, list[TrainConfig]] = {}
    for _, tc in tcs:
        groups.setdefault((tc.batch_tokens, tc.seed, tc.acts, json.dumps(to_flat(tc.source))), []).append(tc)
    for group in groups.values():
        todo = [tc for tc in group if not RunFolder(tc.out).is_finished()]
        if todo:
            train_many(todo, progress=progress, stream_dir=stream_dir)
    if len(streamed) == len(tcs):
        acts = ActivationStore(stream_dir / "heldout")

    model = LazyModel(cfg.harvest.source.model_name)
    loaded = [(name, *load_run(run)) for name, run in runs]
    metrics = evaluate_cached([name for name, _ in runs], [run for _, run in runs],
                              [sae for _, sae, _ in loaded], acts, model, cfg.eval, progress,
                              lambda name, state: log(f"[3/4] eval      {name:<12} {state}"))
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


def evaluate_cached(names: list[str], runs: list[RunFolder], saes: list, acts, model,
                    cfg: EvalConfig, progress: bool,
                    report=lambda name, state: None) -> dict[str, dict]:
    """METHOD §4 metrics of runs on an activation folder, cached in each run folder; the runs
    not cached are evaluated together (the model's own CE passes run once for all of them)."""
    from .metrics.evaluate import evaluate_many

    key = _hash([str(Path(acts.path).resolve()), cfg.eval_tokens, cfg.ce_contexts,
                 cfg.dead_eval_tokens])
    metrics: dict[str, dict] = {}
    todo = []
    for name, run, sae in zip(names, runs, saes, strict=True):
        cache = run.metrics_cache(key)
        if cache.exists():
            report(name, "cached")
            metrics[name] = json.loads(cache.read_text())
        else:
            report(name, "running")
            todo.append((name, cache, sae))
    if todo:
        lm = model.get()
        results = evaluate_many([sae for _, _, sae in todo], acts,
                                lm if lm.has_lm_head else None, cfg, progress=progress)
        for (name, cache, _), result in zip(todo, results, strict=True):
            atomic_write_json(cache, result, indent=None)
            metrics[name] = result
    return {name: metrics[name] for name in names}


def _db_build_hash(db: Path) -> str | None:
    if not db.exists():
        return None
    from .store import open_db

    try:
        with open_db(db) as store:
            return store.build_hash()
    except Exception:  # an unreadable or older file is simply rebuilt
        return None
