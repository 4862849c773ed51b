"""What the trainer writes to log.jsonl: running means between log steps, and the decoder's
redundancy at every checkpoint (duplicates appear late in training, METHOD.md §5)."""

from __future__ import annotations

import torch

from ..metrics.geometry import decoder_geometry, max_cosine, redundancy_row_values
from ..metrics.load import load_entropy


class Window:
    """Running sums over the steps since the last log line."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sums = {"loss": 0.0, "mse": 0.0, "fvu": 0.0, "lb_loss": 0.0, "auxk_loss": 0.0, "l0": 0.0}
        self.load = torch.zeros(self.n_experts)

    @torch.no_grad()
    def add(self, out, loss) -> None:
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
    def summary(self, step: int, tokens: int, lr: float, tps: float, sae, dead_fraction: float) -> dict:
        row = {"step": step, "tokens": tokens, "kind": "train", "lr": lr, "tokens_per_s": round(tps, 1)}
        row.update({k: v / max(self.n, 1) for k, v in self.sums.items()})
        row["dead_fraction"] = dead_fraction
        if self.n_experts > 1 and self.load.sum() > 0:
            row["expert_load_entropy"] = load_entropy(self.load)
        omega = getattr(sae, "omega", None)
        if omega is not None:
            row["omega_mean"] = float(omega.mean())
            row["omega_min"] = float(omega.min())
            row["omega_max"] = float(omega.max())
        self.reset()
        return row


@torch.no_grad()
def redundancy_row(sae, step: int, tokens: int) -> dict:
    """A log line with the decoder's redundancy@τ for every τ and its mean max cosine."""
    overall = max_cosine(decoder_geometry(sae.W_dec.detach())).overall
    return {"step": step, "tokens": tokens, "kind": "redundancy", **redundancy_row_values(overall)}
