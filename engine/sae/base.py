"""The one interface every SAE architecture implements (METHOD.md §1–3).

All SAEs work in *normalised* input space: activations are multiplied by one scalar
(`input_scale`, stored with the SAE) so that E‖x‖² = d (METHOD.md §3 recipe). Codes are
kept sparse as (values, indices) pairs of length k per token, as in EleutherAI sparsify;
decoding is an `embedding_bag` over the k selected decoder rows, so its cost does not
depend on the dictionary width.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

ARCHS = ("topk", "switch", "scale")
WEIGHTINGS = ("softmax", "binary")


@dataclass
class SAEConfig:
    """Architecture of one SAE. Defaults are the recommended values for the offline demo."""

    arch: str = "scale"
    """`topk` (dense, METHOD §1), `switch` (top-1 routing, §2) or `scale` (§3)."""
    d_in: int = 576
    """Width of the activations the SAE reads (the model's d_model at the hook)."""
    width: int = 4608
    """M: total number of features (dictionary width)."""
    experts: int = 16
    """N: number of experts (forced to 1 for `topk`)."""
    active: int = 2
    """e: experts active per token (forced to 1 for `switch` and `topk`)."""
    k: int = 32
    """Global TopK: non-zero features per token."""
    feature_scaling: bool = True
    """Scale only: Feature Scaling with learnable T and ω (METHOD §3); off for the ablation."""
    expert_weighting: str = "softmax"
    """Scale only: `softmax` over the selected router probabilities, or `binary` (0/1) weights."""

    def __post_init__(self) -> None:
        if self.arch == "topk":
            self.experts, self.active = 1, 1
        elif self.arch == "switch":
            self.active = 1

    @property
    def expert_width(self) -> int:
        """m = M / N features per expert."""
        return self.width // self.experts

    def validate(self) -> SAEConfig:
        if self.arch not in ARCHS:
            raise ConfigError(f"Unknown architecture '{self.arch}'; choose one of {', '.join(ARCHS)}.")
        if self.expert_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"Unknown expert weighting '{self.expert_weighting}'; choose softmax or binary."
            )
        for name in ("d_in", "width", "experts", "active", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer.")
        if self.width % self.experts:
            raise ConfigError(
                f"The width ({self.width}) must be divisible by the number of experts ({self.experts})."
            )
        if self.active > self.experts:
            raise ConfigError(
                f"--active ({self.active}) cannot exceed --experts ({self.experts})."
            )
        per_set = self.active * self.expert_width
        if self.k > per_set:
            raise ConfigError(
                f"--k ({self.k}) exceeds the {per_set} features available to a token "
                f"({self.active} active expert(s) × {self.expert_width} features each)."
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[B, k] values of the selected features (≥ 0)."""
    top_indices: Tensor
    """[B, k] global feature indices in [0, M) of the selected features."""
    expert_indices: Tensor | None
    """[B, e] experts each token was routed to, best first (None for dense TopK)."""
    expert_weights: Tensor | None
    """[B, e] the weights w_i those experts' codes were multiplied by (None for dense TopK)."""
    router_probs: Tensor | None
    """[B, N] router probabilities p(x) / g(x) (None for dense TopK)."""
    candidate_acts: Tensor | None
    """[B, C] every feature value computed before the global TopK (C = M dense, e·m MoE)."""
    candidate_indices: Tensor | None
    """[B, C] global feature index of each candidate (None when candidates are all M in order)."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """[B, d] reconstruction in normalised space."""
    codes: EncoderOutput
    """Sparse codes and routing."""
    mse: Tensor
    """Mean over tokens of Σ_dims (x − x̂)² (normalised space)."""
    fvu: Tensor
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² on this batch."""
    lb_loss: Tensor
    """N · Σ_i f_i · P_i (1 when perfectly balanced; 0 for dense TopK)."""
    auxk_loss: Tensor
    """AuxK loss on dead features (0 unless a dead mask was given)."""


class SparseAutoencoder(nn.Module, ABC):
    """Shared parts: decoder, biases, input normalisation, decoding and the losses."""

    cfg: SAEConfig

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg.validate()
        M, d = cfg.width, cfg.d_in
        # METHOD §3: decoder initialised as the encoder, rows unit-norm per feature.
        w = torch.randn(M, d)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.clone())  # [M, d]; MoE views it as [N, m, d]
        self.b_enc = nn.Parameter(torch.zeros(M))
        self.W_dec = nn.Parameter(w.clone())  # [M, d], rows unit-norm
        self.b_dec = nn.Parameter(torch.zeros(d))
        # x_normalised = input_scale · x_raw  (so that E‖x‖² = d on the training set).
        self.register_buffer("input_scale", torch.ones(()))

    # -- subclasses implement ------------------------------------------------------------
    @abstractmethod
    def encode(self, x: Tensor) -> EncoderOutput:
        """Normalised activations [B, d] → sparse codes and routing."""

    def init_biases(self, x: Tensor) -> None:
        """Initialise b_dec (and the router's centring bias) from a batch (METHOD §3)."""
        centre = geometric_median(x)
        with torch.no_grad():
            self.b_dec.copy_(centre)

    # -- shared ----------------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return self.cfg.width

    def feature_expert(self) -> Tensor:
        """[M] the expert each feature belongs to (all 0 for dense TopK)."""
        return torch.arange(self.cfg.width, device=self.W_dec.device) // self.cfg.expert_width

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """x̂ = W_decᵀ z + b_dec, touching only the k selected rows per token."""
        y = F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts, mode="sum")
        return y + self.b_dec

    def dense_codes(self, codes: EncoderOutput) -> Tensor:
        """[B, M] dense code vector z (for analysis and tests; training never builds it)."""
        z = codes.top_acts.new_zeros(codes.top_acts.shape[0], self.cfg.width)
        return z.scatter_(1, codes.top_indices, codes.top_acts)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, auxk_k: int | None = None) -> ForwardOutput:
        codes = self.encode(x)
        x_hat = self.decode(codes.top_acts, codes.top_indices)
        err = x - x_hat
        sq = err.pow(2).sum(-1)
        mse = sq.mean()
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = sq.sum() / total_var.clamp_min(1e-12)
        lb = self.load_balance_loss(codes)
        auxk = x.new_zeros(())
        if dead_mask is not None and bool(dead_mask.any()):
            auxk = self._auxk_loss(err.detach(), codes, dead_mask, auxk_k or x.shape[-1] // 2)
        return ForwardOutput(x_hat, codes, mse, fvu, lb, auxk)

    def load_balance_loss(self, codes: EncoderOutput) -> Tensor:
        """L_lb = N · Σ_i f_i · P_i with f_i from the top-1 expert (METHOD §2)."""
        if codes.router_probs is None:
            return codes.top_acts.new_zeros(())
        N = self.cfg.experts
        top1 = codes.expert_indices[:, 0]
        f = torch.bincount(top1, minlength=N).to(codes.router_probs.dtype) / top1.numel()
        P = codes.router_probs.mean(0)
        return N * (f * P).sum()

    def _auxk_loss(self, err: Tensor, codes: EncoderOutput, dead_mask: Tensor, k_aux: int) -> Tensor:
        """AuxK (Gao et al. 2024): dead features reconstruct the residual; normalised MSE."""
        cand = codes.candidate_acts
        idx = codes.candidate_indices
        dead = dead_mask[idx] if idx is not None else dead_mask.expand_as(cand)
        masked = torch.where(dead, cand, torch.zeros_like(cand))
        k_aux = min(k_aux, int(dead.sum(-1).max()))
        if k_aux == 0:
            return err.new_zeros(())
        vals, pos = masked.topk(k_aux, dim=-1, sorted=False)
        feat = idx.gather(1, pos) if idx is not None else pos
        e_hat = F.embedding_bag(feat, self.W_dec, per_sample_weights=vals, mode="sum")
        num = (e_hat - err).pow(2).sum()
        den = (err - err.mean(0)).pow(2).sum().clamp_min(1e-12)
        return num / den

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out the component of each row's gradient along the (unit) row itself."""
        g = self.W_dec.grad
        if g is None:
            return
        parallel = (g * self.W_dec).sum(-1, keepdim=True)
        g.sub_(parallel * self.W_dec)

    # -- raw-unit helpers for the model-facing code (eval, analysis, steering) ------------
    def normalise(self, x_raw: Tensor) -> Tensor:
        return x_raw * self.input_scale

    def denormalise(self, x: Tensor) -> Tensor:
        return x / self.input_scale

    def reconstruct_raw(self, x_raw: Tensor) -> Tensor:
        """x̂ in the model's units for raw activations of any leading shape [..., d]."""
        shape = x_raw.shape
        flat = self.normalise(x_raw.reshape(-1, shape[-1]).to(self.W_dec.dtype))
        out = self.forward(flat).x_hat
        return self.denormalise(out).reshape(shape).to(x_raw.dtype)

    def encoder_weight(self) -> Tensor:
        """[M, d] the effective (folded) encoder matrix used at inference."""
        return self.W_enc


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; starts from the mean and stops early when it settles."""
    x = x.detach().float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= eps * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y


def route_topk(probs: Tensor, e: int, weighting: str) -> tuple[Tensor, Tensor]:
    """Pick the e most probable experts and their weights (METHOD §3, Multiple Expert Activation).

    `softmax`: w_i = softmax over the *selected probabilities* (not the logits), which gives
    weights near 1/e. `binary`: w_i = 1 for every selected expert (the 0/1 ablation).
    """
    top_p, top_i = probs.topk(e, dim=-1)
    if weighting == "softmax":
        w = torch.softmax(top_p, dim=-1)
    else:
        w = torch.ones_like(top_p)
    return top_i, w


def grouped_expert_encode(
    x_c: Tensor, token_idx: Tensor, expert_idx: Tensor, W: Tensor, b: Tensor
) -> Tensor:
    """ReLU(W[i] x + b[i]) for each (token, expert) pair, computing only those pairs.

    Pairs are sorted by expert and each expert's block is one matmul over just its tokens,
    so the cost is (pairs × m × d), i.e. ~e/N of a dense SAE of the same width.
    x_c [B, d], token_idx/expert_idx [P], W [N, m, d], b [N, m] → [P, m] in pair order.
    """
    N, m, _ = W.shape
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=N).tolist()
    sorted_tokens = token_idx[order]
    # unbind: one autograd node for all experts, rather than a full-size zero gradient per
    # expert slice (which would cost N × M·d writes per backward pass).
    W_i, b_i = W.unbind(0), b.unbind(0)
    blocks = []
    start = 0
    for i, c in enumerate(counts):
        if c == 0:
            continue
        xs = x_c[sorted_tokens[start : start + c]]
        blocks.append(F.relu(F.linear(xs, W_i[i], b_i[i])))
        start += c
    if not blocks:
        return x_c.new_zeros(0, m)
    out_sorted = torch.cat(blocks, 0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out_sorted[inverse]


def lr_for_width(width: int) -> float:
    """METHOD §3: lr = 2e-4 / sqrt(M / 2^14) (OpenAI's TopK scaling rule)."""
    return 2e-4 / math.sqrt(width / 2**14)
