"""Inference-only SAE for dictionaries imported from SAELens: `standard` (ReLU) and `jumprelu`.

Our trainable classes are TopK-based; SAELens SAEs with an L1 (ReLU) or JumpReLU activation
have a variable number of active features per token. This class gives them the same
interface (encode → (top_acts, top_indices), decode, forward, reconstruct_raw) so the
evaluation, analysis and steering code never needs to know where an SAE came from:

    z = ReLU(pre) · 1[pre > θ],    pre = W_enc (x − b_dec) + b_enc     (θ = 0 for `standard`)
    x̂ = W_decᵀ z + b_dec

`encode` returns, per batch, the k_b = max-active-count features of every token (rows with
fewer active features are padded with zeros), so codes stay sparse and `decode` is the same
`embedding_bag` as for TopK. The imported SAE cannot be trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigError, EncoderOutput, SAEConfig, SparseAutoencoder

IMPORTED_ARCHS = ("standard", "jumprelu")


class ImportedSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig):
        # SAEConfig.validate() only knows the trainable architectures, so set up the shared
        # parameters here instead of through SparseAutoencoder.__init__.
        nn.Module.__init__(self)
        if cfg.arch not in IMPORTED_ARCHS:
            raise ConfigError(
                f"ImportedSAE reads only {' or '.join(IMPORTED_ARCHS)} SAEs, not '{cfg.arch}'."
            )
        if cfg.d_in < 1 or cfg.width < 1:
            raise ConfigError("An imported SAE needs positive d_in and width.")
        cfg.experts, cfg.active, cfg.k = 1, 1, cfg.width
        cfg.feature_scaling = False
        self.cfg = cfg
        M, d = cfg.width, cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(M, d))  # [M, d] (SAELens stores the transpose)
        self.b_enc = nn.Parameter(torch.zeros(M))
        self.W_dec = nn.Parameter(torch.zeros(M, d))  # [M, d]; rows need not be unit-norm
        self.b_dec = nn.Parameter(torch.zeros(d))
        # θ per feature; all zeros for `standard`, where ReLU(pre)·1[pre > 0] = ReLU(pre).
        self.threshold = nn.Parameter(torch.zeros(M))
        self.register_buffer("input_scale", torch.ones(()))

    def encode(self, x: Tensor) -> EncoderOutput:
        pre = F.linear(x - self.b_dec, self.W_enc, self.b_enc)
        z = F.relu(pre) * (pre > self.threshold).to(pre.dtype)
        k = int((z > 0).sum(-1).max()) if z.shape[0] else 0
        top_acts, top_indices = z.topk(max(k, 1), dim=-1, sorted=False)
        return EncoderOutput(top_acts, top_indices, None, None, None, z, None)

    def init_biases(self, x: Tensor) -> None:
        raise ConfigError("An imported SAELens SAE is inference-only and cannot be trained.")
