"""The trainer shared by every architecture (METHOD.md §3 "shared training recipe").

One loop for dense TopK, Switch and Scale so that comparisons are fair. A run folder holds:

    cfg.json / train.json   the TrainConfig (and, when done, a summary)
    log.jsonl               one line per logging step
    state/                  the last checkpoint (SAE + Adam state + counters), for resuming
    final/                  the trained SAE (engine.checkpoint format)

Batches are a pure function of (seed, step), so a run killed with `kill -9` and started again
with the same command resumes from its last checkpoint and finishes with the same number of
steps, seeing the same data it would have seen.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .activations import ActivationStore
from .checkpoint import load_sae, save_sae
from .errors import ConfigError, DataError, TrainingError
from .paths import atomic_write
from .sae import SAEConfig, SparseAutoencoder, build_sae
from .sae.base import lr_for_width

FORMAT = "moesae-run/1"


@dataclass
class TrainConfig:
    """One training run. Defaults are the recommended values (METHOD.md §3)."""

    acts: str = ""
    """Activation folder written by `moesae harvest`."""
    out: str = ""
    """Run folder (created; an interrupted run in it is resumed)."""
    arch: str = "scale"
    """topk, switch or scale."""
    width: int = 4608
    """M, total features."""
    experts: int = 16
    """N, experts (ignored by topk)."""
    active: int = 2
    """e, experts per token (scale only)."""
    k: int = 32
    """Global TopK."""
    feature_scaling: bool = True
    """Scale only: learnable T and ω (METHOD §3); --no-feature-scaling for the ablation."""
    expert_weighting: str = "softmax"
    """Scale only: softmax over selected probabilities, or binary 0/1 weights (ablation)."""
    steps: int = 2000
    """Optimiser steps."""
    batch_tokens: int = 4096
    """Tokens per step."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(M / 2^14)."""
    lb_weight: float | None = None
    """α for the load-balancing loss; default 0.01·d (METHOD §2, inputs with E‖x‖² = d)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead features (Gao et al. 2024); 0 turns it off."""
    dead_tokens: int = 500_000
    """A feature that has not fired for this many training tokens counts as dead (for AuxK)."""
    decay_fraction: float = 0.2
    """Linear decay of the lr to 0 over this final fraction of steps."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    checkpoint_every: int = 250
    """Steps between resumable checkpoints."""
    log_every: int = 25
    """Steps between log lines."""
    device: str | None = None
    """cpu, cuda, … (default: cuda when available)."""

    def sae_config(self, d_in: int) -> SAEConfig:
        return SAEConfig(
            arch=self.arch,
            d_in=d_in,
            width=self.width,
            experts=self.experts,
            active=self.active,
            k=self.k,
            feature_scaling=self.feature_scaling,
            expert_weighting=self.expert_weighting,
        )

    def identity(self) -> dict:
        """The fields that define what is trained (not where, how often it logs or on what device)."""
        d = asdict(self)
        for key in ("out", "checkpoint_every", "log_every", "device"):
            d.pop(key)
        d["acts"] = str(Path(self.acts).resolve())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_at(step: int, steps: int, lr: float, decay_fraction: float) -> float:
    """Constant, then linear decay to 0 over the last `decay_fraction` of the steps."""
    decay_start = int(steps * (1 - decay_fraction))
    if step < decay_start:
        return lr
    return lr * max(0.0, (steps - step) / max(1, steps - decay_start))


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Token indices for `step`: consecutive slices of a seeded permutation per epoch."""
    per_epoch = max(1, n // batch)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[offset * batch : (offset + 1) * batch])


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam(0.9, 0.999) (METHOD §3), the fused kernel where this torch build has one."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def _atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        if not cfg.acts:
            raise ConfigError("Give the activation folder with --acts (made by `moesae harvest`).")
        if not cfg.out:
            raise ConfigError("Give the run folder with --out.")
        for name in ("steps", "batch_tokens", "checkpoint_every", "log_every"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer.")
        if not 0 <= cfg.decay_fraction <= 1:
            raise ConfigError("--decay-fraction must be between 0 and 1.")
        try:
            device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ConfigError(f"Unknown device '{cfg.device}'; use cpu, cuda or cuda:N.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but this machine has no CUDA GPU.")
        self.acts = ActivationStore(cfg.acts)
        self.data = self.acts.split("train")
        if self.data.n_tokens < cfg.batch_tokens:
            raise DataError(
                f"The training split of {cfg.acts} has {self.data.n_tokens} tokens, fewer than "
                f"one batch of {cfg.batch_tokens}; harvest more tokens or lower --batch-tokens."
            )
        self.d_in = self.acts.d_in
        self.sae_cfg = cfg.sae_config(self.d_in).validate()
        self.device = device
        self.lr = cfg.lr if cfg.lr is not None else lr_for_width(cfg.width)
        self.lb_weight = cfg.lb_weight if cfg.lb_weight is not None else 0.01 * self.d_in
        self.run = Path(cfg.out)

    # -- data --------------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        idx = batch_indices(self.data.n_tokens, self.cfg.batch_tokens, step, self.cfg.seed)
        x = torch.from_numpy(np.asarray(self.data.read(idx), dtype=np.float32))
        x = x.to(self.device) * self.acts.norm_scale
        if not torch.isfinite(x).all():
            raise TrainingError(
                f"Activations of the batch for step {step} contain NaN or inf; "
                f"re-harvest {self.cfg.acts}."
            )
        return x

    # -- state -------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "model": self.acts.model_name,
            "hook": self.acts.hook,
            "d_in": self.d_in,
            "acts": str(Path(self.cfg.acts).resolve()),
            "train_config": self.cfg.identity(),
        }

    def _save_state(self, sae, opt, step, since_fired) -> None:
        state = self.run / "state"
        tmp = self.run / "state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_sae(sae, tmp / "sae", self._meta())
        sd = opt.state_dict()
        tensors = {"since_fired": since_fired.cpu()}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                tensors[f"{pid}.{key}"] = torch.as_tensor(val).cpu().contiguous()
        save_file(tensors, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(
            json.dumps({"step": step, "param_groups": sd["param_groups"]})
        )
        old = self.run / "state.old"
        shutil.rmtree(old, ignore_errors=True)
        if state.exists():
            os.replace(state, old)
        os.replace(tmp, state)
        shutil.rmtree(old, ignore_errors=True)

    def _load_state(self, sae, opt) -> tuple[int, torch.Tensor]:
        state = self.run / "state"
        try:
            saved, _ = load_sae(state / "sae", device=self.device)
            sae.load_state_dict(saved.state_dict())
            meta = json.loads((state / "state.json").read_text())
            tensors = load_file(str(state / "optim.safetensors"), device=str(self.device))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DataError(
                f"The checkpoint in {state} is unreadable ({exc}); delete it to start over."
            ) from None
        opt_state: dict = {}
        for name, val in tensors.items():
            if name == "since_fired":
                continue
            pid, key = name.split(".", 1)
            opt_state.setdefault(int(pid), {})[key] = val
        opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        return int(meta["step"]), tensors["since_fired"].to(self.device)

    # -- the loop ----------------------------------------------------------------------------
    def run_training(self) -> Path:
        cfg = self.cfg
        self.run.mkdir(parents=True, exist_ok=True)
        cfg_path = self.run / "cfg.json"
        identity = cfg.identity()
        if cfg_path.exists():
            previous = json.loads(cfg_path.read_text()).get("identity")
            if previous != identity:
                raise ConfigError(
                    f"{self.run} holds a run with a different configuration; "
                    "choose another --out or delete that folder."
                )
            if (self.run / "final" / "cfg.json").exists():
                return self.run  # already trained: nothing to do
        _atomic_write_json(cfg_path, {"format": FORMAT, "identity": identity, "config": asdict(cfg)})

        torch.manual_seed(cfg.seed)
        sae: SparseAutoencoder = build_sae(self.sae_cfg).to(self.device)
        sae.input_scale.fill_(self.acts.norm_scale)
        opt = make_adam(sae.parameters(), self.lr)
        M = self.sae_cfg.width
        start = 0
        since_fired = torch.zeros(M, dtype=torch.long, device=self.device)
        if (self.run / "state" / "state.json").exists():
            start, since_fired = self._load_state(sae, opt)
        else:
            # METHOD §3: b_dec (and the router's centring bias) at the geometric median.
            sae.init_biases(self.batch(0)[:4096])
        self._truncate_log(start)

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.arch}", unit="step")
        window = _Window(self.sae_cfg.experts)
        t_last = time.perf_counter()
        tokens_since = 0
        step = start
        last_good = start
        try:
            for step in range(start, cfg.steps):
                x = self.batch(step)
                lr = lr_at(step, cfg.steps, self.lr, cfg.decay_fraction)
                for group in opt.param_groups:
                    group["lr"] = lr
                dead = since_fired > cfg.dead_tokens if cfg.auxk_alpha > 0 else None
                out = sae(x, dead_mask=dead)
                loss = out.mse + self.lb_weight * out.lb_loss + cfg.auxk_alpha * out.auxk_loss
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"Training stopped at step {step}: the loss became {loss.item()}; "
                        f"the last good checkpoint (step {last_good}) is kept in {self.run / 'state'}."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sae.remove_gradient_parallel_to_decoder()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
                opt.step()
                sae.set_decoder_norm_to_unit()

                # TopK may pick zeros when fewer than k candidates are positive: not a firing.
                live = out.codes.top_acts > 0
                fired = torch.bincount(out.codes.top_indices[live], minlength=M) > 0
                since_fired += x.shape[0]
                since_fired[fired] = 0
                window.add(out, loss)
                tokens_since += x.shape[0]
                done = step + 1
                if bar is not None:
                    bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    row = window.summary(done, done * cfg.batch_tokens, lr, tps, sae, since_fired, cfg)
                    self._log(row)
                    if bar is not None:
                        bar.set_postfix(tok_s=f"{tps:,.0f}", fvu=f"{row['fvu']:.3f}")
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    # METHOD §5: duplicates appear only late in training, so track them.
                    self._log(redundancy_row(sae, done, done * cfg.batch_tokens))
                    self._save_state(sae, opt, done, since_fired)
                    last_good = done
        finally:
            if bar is not None:
                bar.close()

        save_sae(sae, self.run / "final", self._meta())
        _atomic_write_json(self.run / "train.json", {"config": asdict(cfg), "steps_done": cfg.steps})
        return self.run

    def _log(self, row: dict) -> None:
        with open(self.run / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_log(self, step: int) -> None:
        """After a resume, drop log lines written after the checkpoint we resume from."""
        path = self.run / "log.jsonl"
        if not path.exists():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in keep))


class _Window:
    """Running sums over the steps since the last log line."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.reset()

    def reset(self):
        self.n = 0
        self.sums = {"loss": 0.0, "mse": 0.0, "fvu": 0.0, "lb_loss": 0.0, "auxk_loss": 0.0, "l0": 0.0}
        self.load = torch.zeros(self.n_experts)

    @torch.no_grad()
    def add(self, out, loss):
        self.n += 1
        self.sums["loss"] += float(loss)
        self.sums["mse"] += float(out.mse)
        self.sums["fvu"] += float(out.fvu)
        self.sums["lb_loss"] += float(out.lb_loss)
        self.sums["auxk_loss"] += float(out.auxk_loss)
        self.sums["l0"] += float((out.codes.top_acts > 0).sum(-1).float().mean())
        if out.codes.expert_indices is not None:
            top1 = out.codes.expert_indices[:, 0].cpu()
            self.load += torch.bincount(top1, minlength=self.n_experts).float()

    @torch.no_grad()
    def summary(self, step, tokens, lr, tps, sae, since_fired, cfg) -> dict:
        row = {"step": step, "tokens": tokens, "kind": "train", "lr": lr, "tokens_per_s": round(tps, 1)}
        row.update({k: v / max(self.n, 1) for k, v in self.sums.items()})
        row["dead_fraction"] = float((since_fired > cfg.dead_tokens).float().mean())
        if self.n_experts > 1 and self.load.sum() > 0:
            p = self.load / self.load.sum()
            ent = -(p[p > 0] * p[p > 0].log()).sum() / math.log(self.n_experts)
            row["expert_load_entropy"] = float(ent)
        omega = getattr(sae, "omega", None)
        if omega is not None:
            row["omega_mean"] = float(omega.mean())
            row["omega_min"] = float(omega.min())
            row["omega_max"] = float(omega.max())
        self.reset()
        return row


@torch.no_grad()
def redundancy_row(sae: SparseAutoencoder, step: int, tokens: int) -> dict:
    """A log line with the decoder's redundancy@{0.7,0.8,0.9} and mean max cosine."""
    from .evaluate import max_cosine, redundancy_ratio

    overall = max_cosine(sae.W_dec.detach()).overall
    row = {"step": step, "tokens": tokens, "kind": "redundancy",
           "mean_max_cos": float(overall.nanmean())}
    for tau in (0.7, 0.8, 0.9):
        row[f"redundancy_ratio_{tau}"] = redundancy_ratio(overall, tau)
    return row


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume, or skip when already done) one SAE; returns the run folder."""
    return Trainer(cfg, progress=progress).run_training()
