"""Scale SAE: Multiple Expert Activation + Feature Scaling (METHOD.md §3; Xu et al. 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import cpu_kernels, kernels
from .base import EncoderOutput, SparseAutoencoder
from .initialisation import geometric_median
from .moe import folds_scaling, products_dtype, route_topk
from .registry import Architecture, register


class ScaleSAE(SparseAutoencoder):
    def __init__(self, cfg):
        super().__init__(cfg)
        N, d = self.cfg.experts, self.cfg.d_in
        self.W_g = nn.Parameter(torch.randn(N, d) / d**0.5 * 0.1)  # gate, [N, d]
        self.b_g = nn.Parameter(torch.zeros(N))
        self.b_gate = nn.Parameter(torch.zeros(d))
        if self.cfg.feature_scaling:
            self.T = nn.Parameter(torch.eye(d))  # shared by all experts, initialised to I
            self.omega = nn.Parameter(torch.zeros(N))  # ω per expert, initialised to 0

    def init_biases(self, x: Tensor) -> None:
        centre = geometric_median(x)
        with torch.no_grad():
            self.b_dec.copy_(centre)
            self.b_gate.copy_(centre)

    def scaled_encoder(self) -> Tensor:
        """Feature Scaling → Ŵ [N, m, d]; the plain encoder when it is switched off. The
        `reference` kernels spell out METHOD §3 with autograd; the `fast` ones compute the same
        Ŵ as one fused multiply-add with a hand-written backward (`_FeatureScaling`)."""
        N, m = self.cfg.experts, self.cfg.expert_width
        W = self.W_enc.view(N, m, -1)  # W_i: expert i's encoder rows
        if not self.cfg.feature_scaling:
            return W
        t_mean = self.cfg.scaling_form == "t_mean"
        if self.kernels != "reference":
            return _FeatureScaling.apply(W, self.T, self.omega, t_mean)
        mean = W.mean(dim=1, keepdim=True)  # mean_j W_i[j,:]          [N, 1, d]
        A = mean @ self.T.T  # Ā_i = T · mean_j W_i[j,:]               [N, 1, d]
        if t_mean:
            H = W - A  # H_i = W_i − Ā_i (METHOD §3, as the authors' code)   [N, m, d]
        else:  # "plain_mean": checkpoints saved before 2026-11-25 computed H_i = W_i − mean
            H = W - mean
        return A + (1 + self.omega)[:, None, None] * H  # Ŵ_i = Ā_i + (1 + ω_i) · H_i

    def encoder_weight(self) -> Tensor:
        return self.scaled_encoder().reshape(self.cfg.width, -1)

    def experts_per_token(self) -> int:
        return self.cfg.active

    def encode(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 0) -> EncoderOutput:
        N, m, e = self.cfg.experts, self.cfg.expert_width, self.cfg.active
        # g = softmax( W_g (x − b_gate) + b_g )
        g = torch.softmax(self.centred_logits(x, self.b_gate, self.W_g) + self.b_g, dim=-1)
        # S = the e experts with the largest g; w_i = softmax over {g_j : j ∈ S}
        S, w = route_topk(g, e, self.cfg.expert_weighting,
                          fast=self.kernels != "reference")  # [B, e], [B, e]
        # z_i = ReLU( Ŵ_i (x − b_dec) + b_enc,i ) for i ∈ S only (tokens grouped by expert);
        # f = concat_i ( w_i · z_i ), zero outside S;  z = TopK_k( f ), one TopK across the e
        b = self.b_enc.view(N, m)
        if (self.cfg.feature_scaling and self.kernels != "reference"
                and folds_scaling(x, products_dtype(x))):
            # Ŵ_i = s_i · W_i + c_i, folded into the encode: Ŵ_i x = s_i · (W_i x) + ⟨c_i, x⟩
            W = self.W_enc.view(N, m, -1)
            t_mean = self.cfg.scaling_form == "t_mean"
            # the experts' means enter as constants; their share of W's gradient, from the
            # shift's, is added in the encode's backward (`mean_grad`), where W's is summed
            _, s, c = _scaling_terms(W.detach().mean(dim=1, keepdim=True), self.T, self.omega,
                                     t_mean)
            T, omega = self.T.detach(), self.omega.detach()
            codes = self.select_topk(
                x, W, b, S, w, dead_mask, k_aux, scaling=(s, c.view(N, -1)),
                mean_grad=lambda G_c: _means_grad(G_c, T, omega, t_mean))
        else:
            codes = self.select_topk(x, self.scaled_encoder(), b, S, w, dead_mask, k_aux)
        return EncoderOutput(codes.top_acts, codes.top_indices, S, w, g,
                             codes.aux_acts, codes.aux_indices)


class _FeatureScaling(torch.autograd.Function):
    """Ŵ_i = Ā_i + (1 + ω_i)·H_i (METHOD §3) written as s_i·W_i + c_i (`_scaling_terms`), one
    fused multiply-add over the M·d weights. Autograd through the plain expression
    makes ~10 passes over [N, m, d] tensors; this backward makes three (Σ_j G, ⟨G, W⟩ per expert,
    and ∂W as one multiply-add). `ScaleSAE.scaled_encoder` with the reference kernels is the
    oracle (tests/engine/sae/test_moe.py). Where the encode takes Feature Scaling folded in
    (`moe.folds_scaling`: float32 on the CPU) none of this runs: `ScaleSAE.encode` hands it
    s_i and c_i, and the share of W's gradient that comes through the experts' means is added
    where the encode's backward sums W's (`_means_grad`)."""

    @staticmethod
    def forward(ctx, W, T, omega, t_mean: bool):
        mean = W.mean(dim=1, keepdim=True)  # mean_i = mean_j W_i[j,:]    [N, 1, d]
        A, s, c = _scaling_terms(mean, T, omega, t_mean)
        ctx.save_for_backward(W, T, omega, mean, A)
        ctx.t_mean = t_mean
        return _affine(W, s[:, None, None], c)  # c_i + s_i · W_i

    @staticmethod
    def backward(ctx, G):
        W, T, omega, mean, A = ctx.saved_tensors
        N, m, d = W.shape
        s = (1 + omega)[:, None, None]
        if kernels.use(G):  # both reductions below from one read of G and W
            G_c, G_s = kernels.group_sums(G, W.to(G.dtype))
        elif cpu_kernels.use(G) and W.dtype == G.dtype:  # the same, in numba: the backward
            # phase of a Scale e=2 step 0.7–0.9 ms shorter at bench_train.py's size (medians of 40
            # interleaved steps), where vecdot alone took ~1.6 ms and `group_sums` ~0.5
            G_c, G_s = cpu_kernels.group_sums(G, W)
        else:
            G_c = G.sum(1, keepdim=True)  # ∂/∂c_i = Σ_j G_i[j,:]   [N, 1, d]
            # ∂/∂s_i from s_i · W_i: ⟨G_i, W_i⟩ per expert; on the CPU at 16 × 288 × 576,
            # vecdot 1.3 ms, a [N, 1, m·d] @ [N, m·d, 1] bmm 8.5 ms, einsum 15 ms
            G_s = torch.linalg.vecdot(G.reshape(N, -1), W.to(G.dtype).reshape(N, -1))
        G_A = -omega[:, None, None] * G_c if ctx.t_mean else G_c  # c = −ω·Ā, or Ā − s·mean
        G_omega = G_s - (G_c * (A if ctx.t_mean else mean)).sum((1, 2))
        G_mean = _means_grad(G_c, T.to(G.dtype), omega, ctx.t_mean)
        grad_W = _affine(G, s, G_mean / m)  # s_i · G_i + ∂mean_i/∂W_i (each row 1/m)
        grad_T = G_A.reshape(N, d).T @ mean.reshape(N, d).to(G.dtype) if ctx.needs_input_grad[1] else None
        return grad_W.to(W.dtype), grad_T, G_omega.to(omega.dtype), None


def _scaling_terms(mean: Tensor, T: Tensor, omega: Tensor, t_mean: bool):
    """Feature Scaling's Ŵ_i = Ā_i + (1 + ω_i) · H_i (METHOD §3) as s_i · W_i + c_i, from the
    experts' mean rows mean_i = mean_j W_i[j,:] [N, 1, d]: (Ā_i = T · mean_i [N, 1, d],
    s_i = 1 + ω_i [N], c_i [N, 1, d]) with
        t_mean:      H_i = W_i − Ā_i     →  c_i = −ω_i · Ā_i
        plain_mean:  H_i = W_i − mean_i  →  c_i = Ā_i − s_i · mean_i"""
    A = mean @ T.T  # Ā_i = T · mean_i
    s = 1 + omega
    c = -omega[:, None, None] * A if t_mean else A - s[:, None, None] * mean
    return A, s, c


def _means_grad(G_c: Tensor, T: Tensor, omega: Tensor, t_mean: bool) -> Tensor:
    """∂loss/∂mean_i from ∂loss/∂c_i (`_scaling_terms`' shift, [N, d] or [N, 1, d]; the same
    shape back), through Ā_i = T · mean_i: t_mean's c_i = −ω_i · Ā_i gives −ω_i · G_c_i · T;
    plain_mean's c_i = Ā_i − s_i · mean_i gives G_c_i · T − s_i · G_c_i."""
    w = omega.to(G_c.dtype).view(-1, *([1] * (G_c.dim() - 1)))
    if t_mean:
        return (-w * G_c) @ T
    return G_c @ T - (1 + w) * G_c


def _affine(X: Tensor, s: Tensor, c: Tensor) -> Tensor:
    """s_i · X_i + c_i for X [N, m, d], s [N, 1, 1], c [N, 1, d]: `torch.addcmul`, or the
    Triton `group_affine` (one vectorised pass) where `kernels.use` says so."""
    if kernels.use(X):
        return kernels.group_affine(X, s.reshape(-1), c, out_dtype=torch.promote_types(
            torch.promote_types(X.dtype, s.dtype), c.dtype))
    return torch.addcmul(c, X, s)


register(Architecture(
    "scale", ScaleSAE, trainable=True, topk_codes=True, routed=True, max_active=None,
    summary="Scale SAE: e experts per token + Feature Scaling (METHOD §3)",
))
