"""Switch SAE: one expert per token (METHOD.md §2; Mudide et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import EncoderOutput, SparseAutoencoder
from .initialisation import geometric_median
from .registry import Architecture, register


class SwitchSAE(SparseAutoencoder):
    def __init__(self, cfg):
        super().__init__(cfg)
        N, d = self.cfg.experts, self.cfg.d_in
        self.W_r = nn.Parameter(torch.randn(N, d) / d**0.5 * 0.1)  # router, [N, d]
        self.b_router = nn.Parameter(torch.zeros(d))

    def init_biases(self, x: Tensor) -> None:
        centre = geometric_median(x)
        with torch.no_grad():
            self.b_dec.copy_(centre)
            self.b_router.copy_(centre)

    def experts_per_token(self) -> int:
        return 1

    def encode(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 0) -> EncoderOutput:
        N, m = self.cfg.experts, self.cfg.expert_width
        # p(x) = softmax( W_r (x − b_router) );  i* = argmax p
        p = torch.softmax(self.centred_logits(x, self.b_router, self.W_r), dim=-1)
        p_star, i_star = p.max(dim=-1)
        S = i_star[:, None]
        w = p_star[:, None] if self.cfg.expert_weighting == "softmax" else torch.ones_like(p_star[:, None])
        # z = TopK_k( p_{i*} · ReLU( W_enc[i*] (x − b_dec) + b_enc[i*] ) ), only expert i*'s m
        # features. The factor p_{i*} is what gives the router a reconstruction gradient (§2).
        codes = self.select_topk(x, self.W_enc.view(N, m, -1), self.b_enc.view(N, m),
                                 S, w, dead_mask, k_aux)
        return EncoderOutput(codes.top_acts, codes.top_indices, S, w, p,
                             codes.aux_acts, codes.aux_indices)


register(Architecture(
    "switch", SwitchSAE, trainable=True, topk_codes=True, routed=True, max_active=1,
    summary="Switch SAE: one expert per token, router-probability scaling (METHOD §2)",
))
