"""Dense TopK SAE (METHOD.md §1; Gao et al. 2024)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import EncoderOutput, SparseAutoencoder
from .registry import Architecture, register


class TopKSAE(SparseAutoencoder):
    def encode(self, x: Tensor) -> EncoderOutput:
        # z = TopK_k( ReLU( W_enc (x − b_dec) + b_enc ) )
        pre = F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))
        top_acts, top_indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(top_acts, top_indices, None, None, None, pre, None)


register(Architecture(
    "topk", TopKSAE, trainable=True, topk_codes=True, routed=False, max_active=None,
    summary="dense TopK (METHOD §1)",
))
