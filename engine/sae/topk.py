"""Dense TopK SAE (METHOD.md §1; Gao et al. 2024)."""

from __future__ import annotations

from torch import Tensor

from .base import EncoderOutput, SparseAutoencoder
from .registry import Architecture, register


class TopKSAE(SparseAutoencoder):
    def encode(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 0) -> EncoderOutput:
        M, d = self.W_enc.shape
        # z = TopK_k( ReLU( W_enc (x − b_dec) + b_enc ) ): the one-expert case of select_topk
        codes = self.select_topk(x, self.W_enc.view(1, M, d), self.b_enc.view(1, M),
                                 None, None, dead_mask, k_aux)
        return EncoderOutput(codes.top_acts, codes.top_indices, None, None, None,
                             codes.aux_acts, codes.aux_indices)


register(Architecture(
    "topk", TopKSAE, trainable=True, topk_codes=True, routed=False, max_active=None,
    summary="dense TopK (METHOD §1)",
))
