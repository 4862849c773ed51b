"""The trainer shared by every architecture (METHOD.md §3 "shared training recipe").

One loop for dense TopK, Switch and Scale so that comparisons are fair. It takes its batches
from a `BatchSource` (engine.data.batches) and keeps everything on disk in a `RunFolder`.
A run killed with `kill -9` and started again with the same command resumes from its last
checkpoint and finishes with the same number of steps, seeing the same data it would have
seen (batches depend only on seed and step; the Adam state is checkpointed).

Nothing inside a step waits for the device: losses, expert load, firing counts and the
first non-finite loss accumulate on it and are read at log and checkpoint steps only. Two
consequences: a NaN is reported at the next log step (with the step it happened at; the
last good checkpoint is kept), and AuxK starts at the first log step at which a feature is
dead (whether any is, and how many — k_aux = min(d/2, #dead) — is read there).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..data.batches import BatchSource, harvest_batches
from ..errors import ConfigError, TrainingError
from ..runtime import Runtime, resolve
from ..sae import SparseAutoencoder, build_sae, registry
from .config import TrainConfig
from .log import Window, redundancy_row
from .run_folder import RunFolder
from .schedule import lr_at, lr_for_width, make_adam


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True, source: BatchSource | None = None):
        self.cfg = cfg
        self.progress = progress
        if source is None and not cfg.acts:
            raise ConfigError("Give the activation folder with --acts (made by `moesae harvest`).")
        if not cfg.out:
            raise ConfigError("Give the run folder with --out.")
        for name in ("steps", "batch_tokens", "checkpoint_every", "log_every"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer.")
        if not 0 <= cfg.decay_fraction <= 1:
            raise ConfigError("--decay-fraction must be between 0 and 1.")
        if not registry.get(cfg.sae.arch).trainable:
            raise ConfigError(
                f"A {cfg.sae.arch} SAE cannot be trained here; choose one of "
                f"{', '.join(registry.trainable())}."
            )
        if cfg.kernels not in ("fast", "reference"):
            raise ConfigError(f"Unknown kernels '{cfg.kernels}'; choose fast or reference.")
        self.rt: Runtime = resolve(cfg.runtime)
        self.device = self.rt.device
        if source is None:
            from ..data.activation_store import ActivationStore

            source = harvest_batches(ActivationStore(cfg.acts), cfg.batch_tokens, cfg.seed,
                                     self.device, cfg.batches)
        self.source = source
        self.d_in = source.d_in
        self.sae_cfg = replace(cfg.sae, d_in=self.d_in).normalised().validate()
        self.lr = cfg.lr if cfg.lr is not None else lr_for_width(self.sae_cfg.width)
        self.lb_weight = cfg.lb_weight if cfg.lb_weight is not None else 0.01 * self.d_in
        self.run = RunFolder(cfg.out)

    def batch(self, step: int) -> torch.Tensor:
        return self.source.batch(step)

    def _meta(self) -> dict:
        return {**self.source.describe(), "d_in": self.d_in, "train_config": self.cfg.identity()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the loop ----------------------------------------------------------------------------
    def run_training(self) -> Path:
        cfg, run = self.cfg, self.run
        run.claim(cfg.identity(), cfg.to_dict())
        if run.is_finished():
            return run.path  # already trained: nothing to do

        torch.manual_seed(cfg.seed)
        sae: SparseAutoencoder = build_sae(self.sae_cfg).to(self.device)
        sae.kernels = cfg.kernels
        sae.input_scale.fill_(self.source.norm_scale)
        opt = make_adam(sae.parameters(), self.lr)
        M = self.sae_cfg.width
        start = 0
        since_fired = torch.zeros(M, dtype=torch.long, device=self.device)
        if run.has_state():
            start, extra = run.load_state(sae, opt, self.device)
            since_fired = extra["since_fired"].to(self.device)
        else:
            # METHOD §3: b_dec (and the router's centring bias) at the geometric median.
            sae.init_biases(self.batch(0)[:4096])
        run.truncate_log(start)

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=f"train {self.sae_cfg.arch}", unit="step")
        window = Window(self.sae_cfg.experts, self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        # AuxK: on once some feature is dead, with k_aux = min(d/2, #dead), both read at log steps
        n_dead = int((since_fired > cfg.dead_tokens).sum()) if cfg.auxk_alpha > 0 else 0
        self._sync()
        t_last = time.perf_counter()
        tokens_since = 0
        last_good = start
        try:
            for step in range(start, cfg.steps):
                x = self.batch(step)
                lr = lr_at(step, cfg.steps, self.lr, cfg.decay_fraction)
                for group in opt.param_groups:
                    group["lr"] = lr
                dead = since_fired > cfg.dead_tokens if n_dead else None
                with self.rt.autocast():
                    out = sae(x, dead_mask=dead, auxk_k=min(self.d_in // 2, n_dead) or None)
                loss = out.mse + self.lb_weight * out.lb_loss + cfg.auxk_alpha * out.auxk_loss
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sae.remove_gradient_parallel_to_decoder()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
                opt.step()
                sae.set_decoder_norm_to_unit()

                # TopK may pick zeros when fewer than k candidates are positive: not a firing.
                fired = torch.zeros(M, device=self.device).scatter_add_(
                    0, out.codes.top_indices.reshape(-1), (out.codes.top_acts > 0).reshape(-1).float()
                )
                since_fired = torch.where(fired > 0, torch.zeros_like(since_fired), since_fired + x.shape[0])
                window.add(out, loss)
                tokens_since += x.shape[0]
                done = step + 1
                if bar is not None:
                    bar.update(1)
                log_now = done % cfg.log_every == 0 or done == cfg.steps
                ckpt_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
                if not (log_now or ckpt_now):
                    continue
                bad_at = int(first_bad)  # the host reads the device here, and only here
                if bad_at >= 0:
                    raise TrainingError(
                        f"Training stopped at step {bad_at}: the loss became NaN or infinite; "
                        f"the last good checkpoint (step {last_good}) is kept in {run.state}."
                    )
                dead_now = since_fired > cfg.dead_tokens
                n_dead = int(dead_now.sum()) if cfg.auxk_alpha > 0 else 0
                if log_now:
                    self._sync()
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)  # checkpoints included
                    t_last, tokens_since = now, 0
                    dead_fraction = float(dead_now.float().mean())
                    row = window.summary(done, done * cfg.batch_tokens, lr, tps, sae, dead_fraction)
                    run.append_log(row)
                    if bar is not None:
                        bar.set_postfix(tok_s=f"{tps:,.0f}", fvu=f"{row['fvu']:.3f}")
                if ckpt_now:
                    # METHOD §5: duplicates appear only late in training, so track them.
                    run.append_log(redundancy_row(sae, done, done * cfg.batch_tokens))
                    run.save_state(sae, opt, done, {"since_fired": since_fired}, self._meta())
                    last_good = done
        finally:
            if bar is not None:
                bar.close()
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

        run.save_final(sae, self._meta(), cfg.to_dict(), cfg.steps)
        return run.path


def train(cfg: TrainConfig, progress: bool = True, source: BatchSource | None = None) -> Path:
    """Train (or resume, or skip when already done) one SAE; returns the run folder."""
    return Trainer(cfg, progress=progress, source=source).run_training()
