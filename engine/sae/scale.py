"""Scale SAE: Multiple Expert Activation + Feature Scaling (METHOD.md §3; Xu et al. 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import EncoderOutput, SparseAutoencoder
from .initialisation import geometric_median
from .moe import route_topk
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
        """Feature Scaling → Ŵ [N, m, d]; the plain encoder when it is switched off."""
        N, m = self.cfg.experts, self.cfg.expert_width
        W = self.W_enc.view(N, m, -1)  # W_i: expert i's encoder rows
        if not self.cfg.feature_scaling:
            return W
        mean = W.mean(dim=1, keepdim=True)  # mean_j W_i[j,:]          [N, 1, d]
        A = mean @ self.T.T  # Ā_i = T · mean_j W_i[j,:]               [N, 1, d]
        if self.cfg.scaling_form == "t_mean":
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
        g = torch.softmax((x - self.b_gate) @ self.W_g.T + self.b_g, dim=-1)
        # S = the e experts with the largest g; w_i = softmax over {g_j : j ∈ S}
        S, w = route_topk(g, e, self.cfg.expert_weighting)  # [B, e], [B, e]
        # z_i = ReLU( Ŵ_i (x − b_dec) + b_enc,i ) for i ∈ S only (tokens grouped by expert);
        # f = concat_i ( w_i · z_i ), zero outside S;  z = TopK_k( f ), one TopK across the e
        codes = self.select_topk(x - self.b_dec, self.scaled_encoder(), self.b_enc.view(N, m),
                                 S, w, dead_mask, k_aux)
        return EncoderOutput(codes.top_acts, codes.top_indices, S, w, g,
                             codes.aux_acts, codes.aux_indices)


register(Architecture(
    "scale", ScaleSAE, trainable=True, topk_codes=True, routed=True, max_active=None,
    summary="Scale SAE: e experts per token + Feature Scaling (METHOD §3)",
))
