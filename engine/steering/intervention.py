"""Steering: change what an SAE's features (or a MoE SAE's experts) contribute at the SAE's hook
while the model generates, and compare the continuation with the unsteered one.

Every intervention is a function `act [B, T, d] → act` applied at the hook while the shared
`LoadedModel.generate` runs (registered once around it with `LoadedModel.hooked`, which removes
it afterwards even on error).
Activations at the hook are in the model's units (raw); the SAE works on `x_norm = s · x_raw`
(`sae.input_scale`), so every change made in SAE space is divided by s before it is added.

- `add`:    x' = x + Σ_f strength_f · W_dec[f] / s        (no SAE encode at all)
- `clamp`:  z'_f = value_f;   `scale`: z'_f = factor_f · z_f
- `ablate_expert` E: z'_f = 0 for every feature of expert E
- `force_expert` E: the codes are those of routing every token to E alone (router probabilities
  replaced by a one-hot on E, so its weight is 1; METHOD §2–3 with S = {E}).

Code edits keep the SAE's error term: x' = denorm(decode(z')) + (x − denorm(decode(z))), which is
computed as x + W_decᵀ(z' − z) / s — the same vector (b_dec cancels), exactly x where z' = z, and
only the edited features' decoder rows are touched.

`positions='generated'` steers the last prompt position (it predicts the first new token) and
every generated position; the rest of the prompt is read unsteered.

Results are cached by `engine.steering.cache.spec_key` in `engine.store.SteeringCache`, a sidecar file beside the
build (`<db>.steer.duckdb`), because the explorer holds the build itself read-only and DuckDB
allows one writer per file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import SteerSpec

if TYPE_CHECKING:
    from ..sae import SparseAutoencoder

def forced_codes(sae: SparseAutoencoder, x_norm: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """(top_acts, top_indices) of `x_norm` [n, d] when the router sends every token to `expert`.

    Written here from the SAE's public pieces (folded encoder, b_enc, b_dec, expert_width) so the
    SAE classes stay exactly METHOD §2–3: with a one-hot router, S = {E} and w_E = 1, so
    z = TopK_k( ReLU( Ŵ_E (x − b_dec) + b_enc,E ) ), k capped at the expert's m features.
    """
    N, m = sae.cfg.experts, sae.cfg.expert_width
    W = sae.encoder_weight().view(N, m, -1)[expert]  # Ŵ_E (Feature Scaling folded in)
    b = sae.b_enc.view(N, m)[expert]
    z = F.relu(F.linear(x_norm - sae.b_dec, W, b))
    top_acts, local = z.topk(min(sae.cfg.k, m), dim=-1, sorted=False)
    return top_acts, local + expert * m


class Intervention:
    """The hook function of one SteerSpec: `fn(act [B, T, d]) -> act`.

    `generate` calls it on the prompt, then on one position a step (a KV cache, on the model's
    own forward pass), or on the whole sequence each step (through TransformerLens's bridge):
    it tracks how far the sequence has grown to know the absolute position of each row (needed
    for positions='generated').
    """

    def __init__(self, sae: SparseAutoencoder, spec: SteerSpec, prompt_len: int,
                 skip_bos: bool = False):
        self.sae, self.spec = sae, spec
        self.prompt_len = prompt_len
        # The BOS position (an attention sink the SAE never saw: harvest drops it) stays as is.
        first = 1 if skip_bos else 0
        self.start = first if spec.positions == "all" else max(prompt_len - 1, first)
        W = sae.W_dec.detach()
        scale = sae.input_scale.detach()
        feats = torch.tensor([f for f, _ in spec.features], dtype=torch.long, device=W.device)
        vals = torch.tensor([s for _, s in spec.features], dtype=W.dtype, device=W.device)
        self.feats, self.vals = feats, vals
        self.add_vec: Tensor | None = None
        if spec.mode == "add" and len(feats):
            # Σ_f strength_f · W_dec[f], undone to the model's units
            self.add_vec = (vals[:, None] * W[feats]).sum(0) / scale
        self.edits_codes = (
            (spec.mode in ("clamp", "scale") and len(feats) > 0)
            or spec.ablate_expert is not None
            or spec.force_expert is not None
        )
        self._seen = 0

    # -- pure ------------------------------------------------------------------------------
    @torch.no_grad()
    def code_edit(self, x_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For rows x_raw [n, d]: (z [n, M], z' [n, M], Δx_raw [n, d]) — the SAE code before and
        after the edit, and x' − x = W_decᵀ (z' − z) / s (the error term is kept)."""
        sae, spec = self.sae, self.spec
        x = sae.normalise(x_raw.to(sae.W_dec.dtype))
        codes = sae.encode(x)
        z = sae.dense_codes(codes)
        if spec.force_expert is not None:
            acts, idx = forced_codes(sae, x, spec.force_expert)
            z_new = z.new_zeros(z.shape).scatter_(1, idx, acts)
        else:
            z_new = z.clone()
        if spec.ablate_expert is not None:
            m = sae.cfg.expert_width
            z_new[:, spec.ablate_expert * m : (spec.ablate_expert + 1) * m] = 0
        if len(self.feats):
            if spec.mode == "clamp":
                z_new[:, self.feats] = self.vals
            elif spec.mode == "scale":
                z_new[:, self.feats] = z_new[:, self.feats] * self.vals
        changed = (z_new != z).any(0).nonzero().squeeze(1)
        dz = (z_new - z)[:, changed]
        delta = sae.denormalise(dz @ sae.W_dec.detach()[changed])
        return z, z_new, delta.to(x_raw.dtype)

    @torch.no_grad()
    def apply(self, act: Tensor, offset: int = 0) -> Tensor:
        """act [B, T, d] whose first row is absolute position `offset` → the steered act."""
        first = max(self.start - offset, 0)
        if first >= act.shape[1]:
            return act
        out = act.clone()
        part = out[:, first:]
        if self.edits_codes:
            flat = part.reshape(-1, part.shape[-1])
            _, _, delta = self.code_edit(flat)
            part += delta.reshape(part.shape)
        if self.add_vec is not None:
            part += self.add_vec.to(part.dtype)
        return out

    # -- the hook --------------------------------------------------------------------------
    def __call__(self, act: Tensor) -> Tensor:
        T = act.shape[1]
        if T == 1 and self._seen >= max(self.prompt_len, 1):  # a cached step: one new position
            offset = self._seen
            self._seen += 1
        else:  # the whole sequence again
            offset = 0
            self._seen = T
        return self.apply(act, offset)
