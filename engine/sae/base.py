"""The one interface every SAE architecture implements (METHOD.md §1–3).

All SAEs work in *normalised* input space: activations are multiplied by one scalar
(`input_scale`, stored with the SAE) so that E‖x‖² = d (METHOD.md §3 recipe). Codes are
kept sparse as (values, indices) pairs of length k per token, as in EleutherAI sparsify;
decoding is an `embedding_bag` over the k selected decoder rows, so its cost does not
depend on the dictionary width.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAEConfig
from .initialisation import geometric_median, unit_rows


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
        self.cfg = cfg = cfg.normalised().validate()
        M, d = cfg.width, cfg.d_in
        # METHOD §3: decoder initialised as the encoder, rows unit-norm per feature.
        w = unit_rows(M, d)
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

    def fingerprint(self) -> str:
        """A short hash of the configuration and weights, so that results cached for one SAE
        (steering) are never served for a retrained one saved under the same name. Computed
        once per state of the weights (it follows the tensors' in-place version counters)."""
        state = self.state_dict()
        versions = tuple(t._version for t in state.values())
        cached = self.__dict__.get("_fingerprint")
        if cached is not None and cached[0] == versions:
            return cached[1]
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        for name, t in sorted(state.items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        fp = h.hexdigest()[:16]
        self.__dict__["_fingerprint"] = (versions, fp)
        return fp
