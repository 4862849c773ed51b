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
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels, kernels
from .config import SAEConfig
from .initialisation import geometric_median, unit_rows
from .moe import (
    TopKCodes,
    decode_picks,
    expert_counts,
    expert_encoder,
    grouped_expert_encode,
    picks_decoder,
    products_dtype,
    router_logits,
    router_logits_fused,
    topk_encode,
    topk_encode_sparse,
    with_column_sums,
)

KERNELS = ("fast", "reference")
Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the processes of data-parallel training (differentiably)."""


def centred_sq_sum(v: Tensor, reduce: Reduce | None) -> Tensor:
    """Σ ‖v − mean(v)‖² over the rows of every process (v [B, d], not differentiated)."""
    if reduce is None:
        if cpu_kernels.use(v) and v.dim() == 2 and not v.requires_grad:
            return cpu_kernels.centred_sq_sum(v)  # one read of v, float64 sums
        if _one_read(v, v):  # the same on CUDA, in Triton
            return kernels.squared_error(v, v)[1]
        return torch.linalg.vector_norm(v - v.mean(0)).square()  # 1.2 vs 1.8 ms: pow().sum()
    n = reduce(v.new_tensor(float(v.shape[0])))
    s1 = reduce(v.sum(0))
    return reduce(v.pow(2).sum()) - s1.pow(2).sum() / n


def squared_error(x_hat: Tensor, x: Tensor, reduce: Reduce | None = None,
                  fast: bool = True) -> tuple[Tensor, Tensor]:
    """(Σ‖x̂ − x‖² over this process's tokens, differentiable in x̂; the FVU's denominator
    `centred_sq_sum(x, reduce)`). `F.mse_loss` with reduction "sum" and `centred_sq_sum`; with
    `fast`, in float32 and one process, both from one read of x̂ and x and the gradient in one
    pass (`_SquaredError`: numba's kernels on the CPU, Triton's on CUDA)."""
    if fast and reduce is None and _one_read(x_hat, x):
        return _SquaredError.apply(x_hat, x)
    return F.mse_loss(x_hat, x, reduction="sum"), centred_sq_sum(x, reduce)


def _one_read(x_hat: Tensor, x: Tensor) -> bool:
    """Whether `_SquaredError`'s kernels take x̂ and x: float32 [B, d] (B ≥ 1) of one shape, x
    not differentiated, the numba kernels running (CPU) or the Triton ones (CUDA)."""
    return (x_hat.dtype == x.dtype == torch.float32 and x_hat.dim() == 2
            and x.shape == x_hat.shape and x.shape[0] > 0 and not x.requires_grad
            and (cpu_kernels.use(x_hat) or kernels.use(x_hat)))


class _SquaredError(torch.autograd.Function):
    """(Σ (x̂ − x)², Σ‖x − mean x‖²) from one read of each (float64 sums; `F.mse_loss` writes
    the squared differences out and sums them again, and the spread reads x three times), and
    the first's gradient 2·g·(x̂ − x) in one pass: numba's `cpu_kernels.squared_error` and
    `scaled_diff` on the CPU, Triton's `kernels.squared_error` and `scaled_diff` on CUDA (g
    read on the device there)."""

    @staticmethod
    def forward(ctx, x_hat, x):
        ctx.save_for_backward(x_hat, x)
        sse, spread = (cpu_kernels if cpu_kernels.use(x_hat) else kernels).squared_error(x_hat, x)
        ctx.mark_non_differentiable(spread)
        return sse, spread

    @staticmethod
    def backward(ctx, g, _g_spread):
        x_hat, x = ctx.saved_tensors
        if cpu_kernels.use(x_hat):  # and its column sums, for b_dec's gradient in the decode's
            grad, sums = cpu_kernels.scaled_diff(x_hat, x, 2.0 * float(g), column_sums=True)
            return with_column_sums(grad, sums), None
        return kernels.scaled_diff(x_hat, x, g), None


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
    aux_acts: Tensor | None = None
    """[B, k_aux] the largest pre-TopK values among dead features (AuxK), when asked."""
    aux_indices: Tensor | None = None
    """[B, k_aux] their feature indices."""


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
        self.kernels = "fast"
        """`fast` (sparse backward; grouped GEMM where it is sync-free) or `reference` (plain
        autograd, the test oracle); see engine/sae/moe.py. Not saved: it changes no result
        beyond float rounding."""

    # -- subclasses implement ------------------------------------------------------------
    @abstractmethod
    def encode(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 0) -> EncoderOutput:
        """Normalised activations [B, d] → sparse codes and routing; with a `dead_mask` [M],
        also the k_aux largest pre-TopK values among dead features (AuxK)."""

    def init_biases(self, x: Tensor) -> None:
        """Initialise b_dec (and the router's centring bias) from a batch (METHOD §3)."""
        centre = geometric_median(x)
        with torch.no_grad():
            self.b_dec.copy_(centre)

    def experts_per_token(self) -> int | None:
        """How many experts encode each token (None: a dense SAE, every feature competes)."""
        return None

    def step_waits_for_device(self, device: torch.device, compute: torch.dtype) -> bool:
        """Whether a training step with these kernels reads the device on the host (so it can
        be neither free of host synchronisation nor recorded as a CUDA graph): the reference
        always, the fast kernels where the experts' matmuls fall back to a loop of one per
        expert (the grouped GEMM runs in bf16 on Hopper and Blackwell; a dense SAE has none)."""
        if self.kernels == "reference":
            return True
        routed = self.experts_per_token() is not None
        return routed and expert_encoder(device, compute) is grouped_expert_encode

    @torch.no_grad()
    def dead_candidates_bound(self, dead_mask: Tensor) -> int:
        """The most dead features one token's TopK can choose among: every dead feature for a
        dense SAE; for a routed one, those of the e experts with the most dead features. AuxK
        takes min(d/2, this) picks — asking for more only adds zero picks, each of which costs
        a row in the sparse backward. Reads the device, so the trainer calls it at log steps."""
        e = self.experts_per_token()
        if e is None:
            return int(dead_mask.sum())
        per_expert = dead_mask.view(self.cfg.experts, -1).sum(1)
        return int(per_expert.topk(min(e, self.cfg.experts)).values.sum())

    # -- shared ----------------------------------------------------------------------------
    def select_topk(self, x: Tensor, W: Tensor, b: Tensor, experts: Tensor | None,
                    weights: Tensor | None, dead_mask: Tensor | None, k_aux: int,
                    scaling: tuple[Tensor, Tensor] | None = None,
                    mean_grad: Callable[[Tensor], Tensor] | None = None) -> TopKCodes:
        """z = TopK_k( concat_{i ∈ experts} w_i · ReLU(W_i (x − b_dec) + b_i) ) (+ AuxK picks),
        by the kernels this SAE is set to (engine/sae/moe.py). W [N, m, d], b [N, m]; with
        `scaling` (the fast kernels, where `moe.folds_scaling` says so) W_i stands for
        scale_i · W_i + shift_i, and `mean_grad` is `topk_encode_sparse`'s."""
        compute = products_dtype(x)
        if self.kernels == "reference":
            return topk_encode(x, self.b_dec, W, b, self.cfg.k, experts, weights, dead_mask,
                               k_aux, encode=grouped_expert_encode)
        return topk_encode_sparse(x, self.b_dec, W, b, self.cfg.k, experts, weights, dead_mask,
                                  k_aux, encode=expert_encoder(x.device, compute),
                                  compute_dtype=compute, scaling=scaling, mean_grad=mean_grad)

    def centred_logits(self, x: Tensor, centre: Tensor, W: Tensor) -> Tensor:
        """A router's (x − centre) · Wᵀ, by the kernels this SAE is set to."""
        fn = router_logits if self.kernels == "reference" else router_logits_fused
        return fn(x, centre, W)

    @property
    def num_features(self) -> int:
        return self.cfg.width

    def feature_expert(self) -> Tensor:
        """[M] the expert each feature belongs to (all 0 for dense TopK)."""
        return torch.arange(self.cfg.width, device=self.W_dec.device) // self.cfg.expert_width

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """x̂ = W_decᵀ z + b_dec, touching only the k selected rows per token."""
        return self.decode_rows(top_acts, top_indices, self.b_dec)

    def decode_rows(self, acts: Tensor, indices: Tensor, bias: Tensor | None = None) -> Tensor:
        """Σ_j acts[b, j] · W_dec[indices[b, j]] (+ bias), by the kernels this SAE is set to."""
        W = self.W_dec
        decode = decode_picks if self.kernels == "reference" else picks_decoder(W.device, W.dtype)
        return decode(acts.to(W.dtype), indices, W, bias)

    def dense_codes(self, codes: EncoderOutput) -> Tensor:
        """[B, M] dense code vector z (for analysis and tests; training never builds it)."""
        z = codes.top_acts.new_zeros(codes.top_acts.shape[0], self.cfg.width)
        return z.scatter_(1, codes.top_indices, codes.top_acts)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, auxk_k: int | None = None,
                reduce: Reduce | None = None) -> ForwardOutput:
        """Reconstruction and losses of normalised activations x [B, d]. With a `dead_mask`
        [M], the AuxK loss of those features (weight it in the trainer). In data-parallel
        training, `reduce` sums a tensor over all processes (differentiably), so that the
        losses that are not plain means over tokens use the whole global batch."""
        k_aux = (auxk_k or x.shape[-1] // 2) if dead_mask is not None else 0
        codes = self.encode(x, dead_mask, k_aux)
        x_hat = self.decode(codes.top_acts, codes.top_indices)
        # mse = mean over tokens of ‖x − x̂‖², as one fused kernel forward and backward
        sse, spread = squared_error(x_hat, x, reduce, fast=self.kernels != "reference")
        mse = sse / x.shape[0]
        sse = sse.detach()
        fvu = (reduce(sse) if reduce else sse) / spread.clamp_min(1e-12)
        lb = self.load_balance_loss(codes, reduce)
        auxk = x.new_zeros(())
        if codes.aux_acts is not None:
            err = (x - x_hat).detach()
            auxk = self._auxk_loss(err, codes, reduce) * dead_mask.any()  # 0 if none dead
        return ForwardOutput(x_hat, codes, mse, fvu, lb, auxk)

    def load_balance_loss(self, codes: EncoderOutput, reduce: Reduce | None = None) -> Tensor:
        """L_lb = N · Σ_i f_i · P_i with f_i from the top-1 expert (METHOD §2)."""
        if codes.router_probs is None:
            return codes.top_acts.new_zeros(())
        N = self.cfg.experts
        top1 = codes.expert_indices[:, 0]
        counts = expert_counts(top1, N).to(codes.router_probs.dtype)
        if reduce is None:
            f = counts / top1.numel()
            P = codes.router_probs.mean(0)
        else:  # over the global batch
            n = reduce(counts.sum())
            f = reduce(counts) / n
            P = reduce(codes.router_probs.sum(0)) / n
        return N * (f * P).sum()

    def _auxk_loss(self, err: Tensor, codes: EncoderOutput, reduce: Reduce | None = None) -> Tensor:
        """AuxK (Gao et al. 2024): dead features reconstruct the residual; normalised MSE."""
        e_hat = self.decode_rows(codes.aux_acts, codes.aux_indices)
        num = (e_hat - err).pow(2).sum()
        if reduce is not None:
            num = reduce(num)
        return num / centred_sq_sum(err, reduce).clamp_min(1e-12)

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        """W_f /= max(‖W_f‖, 1e-8) for each decoder row; one Triton pass where `kernels.use`
        (the fast kernels only: `reference` keeps PyTorch's)."""
        if self.kernels != "reference" and kernels.use(self.W_dec) and self.W_dec.is_contiguous():
            kernels.unit_rows_(self.W_dec, 1e-8)
            return
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out the component of each row's gradient along the (unit) row itself; one
        Triton pass over both where `kernels.use` (two passes and a strided one in PyTorch)."""
        g = self.W_dec.grad
        if g is None:
            return
        if (self.kernels != "reference" and kernels.use(g) and g.is_contiguous()
                and self.W_dec.is_contiguous()):
            kernels.project_rows_(g, self.W_dec)
            return
        parallel = torch.linalg.vecdot(g, self.W_dec)  # ⟨g_f, W_f⟩ per row
        g.addcmul_(parallel[:, None], self.W_dec, value=-1)  # g_f −= ⟨g_f, W_f⟩ · W_f, in place

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
