"""Inference-only SAE for dictionaries imported from SAELens: `standard` (ReLU) and `jumprelu`.

Our trainable classes are TopK-based; SAELens SAEs with an L1 (ReLU) or JumpReLU activation
have a variable number of active features per token. This class gives them the same
interface (encode → (top_acts, top_indices), decode, forward, reconstruct_raw) so the
evaluation and steering code never needs to know where an SAE came from:

    z = ReLU(pre) · 1[pre > θ],    pre = W_enc (x − b_dec) + b_enc     (θ = 0 for `standard`)
    x̂ = W_decᵀ z + b_dec

`encode` returns, per batch, the k_b = max-active-count features of every token (rows with
fewer active features are padded with zeros), so codes stay sparse and `decode` is the same
`embedding_bag` as for TopK. The imported SAE cannot be trained, and its codes are not
TopK-shaped, so the analysis pass refuses it (the registry says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import EncoderOutput, SparseAutoencoder
from .config import SAEConfig
from .registry import Architecture, register


class ImportedSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig):
        # One expert; every feature may be active, so k is the width.
        super().__init__(SAEConfig(**{**cfg.to_dict(), "k": cfg.width, "feature_scaling": False}))
        with torch.no_grad():  # weights come from the imported file; W_dec rows need not be unit-norm
            for p in (self.W_enc, self.W_dec):
                p.zero_()
        # θ per feature; all zeros for `standard`, where ReLU(pre)·1[pre > 0] = ReLU(pre).
        self.threshold = nn.Parameter(torch.zeros(self.cfg.width))

    def encode(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 0) -> EncoderOutput:
        pre = F.linear(x - self.b_dec, self.W_enc, self.b_enc)
        z = F.relu(pre) * (pre > self.threshold).to(pre.dtype)
        k = int((z > 0).sum(-1).max()) if z.shape[0] else 0
        top_acts, top_indices = z.topk(max(k, 1), dim=-1, sorted=False)
        return EncoderOutput(top_acts, top_indices, None, None, None)

    def init_biases(self, x: Tensor) -> None:
        raise ConfigError("An imported SAELens SAE is inference-only and cannot be trained.")


for _name, _summary in (("standard", "SAELens standard (ReLU) SAE, imported, inference only"),
                        ("jumprelu", "SAELens JumpReLU SAE, imported, inference only")):
    register(Architecture(_name, ImportedSAE, trainable=False, topk_codes=False, routed=False,
                          max_active=None, summary=_summary))
