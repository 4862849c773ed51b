"""What the trainer writes to log.jsonl: running means between log steps, accumulated on the
training device and read once per log step (no host synchronisation in between), and the
decoder's redundancy at every checkpoint (duplicates appear late in training, METHOD.md §5)."""

from __future__ import annotations

import torch

from ..metrics.geometry import decoder_geometry, max_cosine, redundancy_row_values
from ..metrics.load import load_entropy
from ..sae.moe import expert_counts

_KEYS = ("loss", "mse", "fvu", "lb_loss", "auxk_loss", "l0")


class Window:
    """Running sums over the steps since the last log line, kept on the device — the step count
    too, so that a step recorded once as a CUDA graph and replayed still counts each replay."""

    def __init__(self, n_experts: int, device: torch.device):
        self.n_experts, self.device = n_experts, device
        # the sums of _KEYS, then the number of steps added
        self.sums = torch.zeros(len(_KEYS) + 1, dtype=torch.float64, device=device)
        self.load = torch.zeros(n_experts, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Zeroed in place: a recorded step keeps writing to the same memory."""
        self.sums.zero_()
        self.load.zero_()

    @torch.no_grad()
    def add(self, out, loss) -> None:
        l0 = (out.codes.top_acts > 0).sum(-1).float().mean()
        one = torch.ones((), device=l0.device)
        self.sums += torch.stack([loss, out.mse, out.fvu, out.lb_loss, out.auxk_loss, l0, one]).detach().double()
        if out.codes.expert_indices is not None:
            self.load += expert_counts(out.codes.expert_indices[:, 0], self.n_experts)

    @torch.no_grad()
    def summary(self, step: int, tokens: int, lr: float, tps: float, sae, dead_fraction: float) -> dict:
        row = {"step": step, "tokens": tokens, "kind": "train", "lr": lr, "tokens_per_s": round(tps, 1)}
        means = (self.sums[:-1] / self.sums[-1].clamp(min=1)).tolist()
        row.update(zip(_KEYS, means, strict=True))
        row["dead_fraction"] = dead_fraction
        if self.n_experts > 1 and int(self.load.sum()) > 0:
            row["expert_load_entropy"] = load_entropy(self.load.cpu())
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
