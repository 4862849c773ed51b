"""Logit effects of features: which output tokens a decoder direction promotes or suppresses."""

from __future__ import annotations

import torch
from torch import Tensor

LOGIT_NOTE = (
    "Logit effect of feature f = (W_dec[f] ⊙ γ) @ W_U, where γ is the learned scale of the "
    "model's final norm (its weight; LayerNorm's centring is applied too, its bias is not). The "
    "norm's division by the residual's RMS depends on the whole residual, not on the feature, so "
    "it is left out: values are a per-unit-activation direction effect, comparable across features."
)


@torch.no_grad()
def logit_effects(W_dec: Tensor, model, n: int = 10, block: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Top-n positive and negative output tokens of (W_dec[f] ⊙ γ) @ W_U (see LOGIT_NOTE)."""
    if not getattr(model, "has_lm_head", True):
        return None
    try:
        W_U = model.unembed_matrix().detach().float().cpu()  # [d, V]
    except Exception:  # no LM head (encoder models): the feature page shows none
        return None
    d = W_U.shape[0]
    gamma, centre = _final_norm_scale(model, d)
    W = W_dec.detach().float()
    M, V = W.shape[0], W_U.shape[1]
    n = min(n, V)
    pos_v, pos_i = torch.empty(M, n), torch.empty(M, n, dtype=torch.long)
    neg_v, neg_i = torch.empty(M, n), torch.empty(M, n, dtype=torch.long)
    for s in range(0, M, block):
        x = W[s : s + block]
        if centre:
            x = x - x.mean(1, keepdim=True)
        L = (x * gamma) @ W_U
        pos_v[s : s + block], pos_i[s : s + block] = L.topk(n, dim=1)
        v, i = (-L).topk(n, dim=1)
        neg_v[s : s + block], neg_i[s : s + block] = -v, i
    return pos_v, pos_i, neg_v, neg_i


def _final_norm_scale(model, d: int) -> tuple[Tensor, bool]:
    """γ of the final norm and whether it centres (LayerNorm); ones when there is none."""
    tl = getattr(model, "model", None)
    ln = getattr(tl, "ln_final", None) if tl is not None else None
    if ln is None:
        return torch.ones(d), False
    comp = getattr(ln, "original_component", None) or ln
    w = None
    for name in ("weight", "w"):
        t = getattr(comp, name, None)
        if isinstance(t, Tensor) and t.numel() == d:
            w = t
            break
    centre = "layernorm" in type(comp).__name__.lower() and "rms" not in type(comp).__name__.lower()
    if w is None:
        return torch.ones(d), centre
    # Gemma-style RMSNorm stores γ − 1
    if "gemma" in type(comp).__name__.lower():
        w = w + 1
    return w.detach().float().cpu(), centre
