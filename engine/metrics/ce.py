"""CE loss recovered and KL: the SAE's reconstruction spliced into the model at its hook, vs
zero-ablation and vs no intervention (METHOD.md §4)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import names


def eval_context_ids(split: Iterable[str]) -> list[int]:
    """Indices of the contexts in the eval split (order preserved)."""
    return [i for i, s in enumerate(split) if s == "eval"]


@torch.no_grad()
def ce_metrics(sae, acts: Any, model: Any, ce_contexts: int, ce_batch: int) -> dict[str, Any]:
    """CE with x̂ spliced in at the hook, with zero-ablation, and without intervention; KL.

    Position 0 (BOS, or the attention-sink first token; never in the SAE's training data) keeps
    its original activation in both interventions, and the losses are taken on the predictions
    made at positions 1..T−2, the ones whose hook activation was replaced.
    """
    return ce_metrics_many([sae], acts, model, ce_contexts, ce_batch)[0]


@torch.no_grad()
def ce_metrics_many(saes: list, acts: Any, model: Any, ce_contexts: int,
                    ce_batch: int) -> list[dict[str, Any]]:
    """`ce_metrics` of several SAEs on the same activations: the original and zero-ablated
    forward passes of each batch run once for all of them (a build evaluates its SAEs so)."""
    tokens, _, split = acts.contexts()
    eval_ids = eval_context_ids(split)[:ce_contexts]
    if not eval_ids or np.asarray(tokens).shape[1] < 3:
        return [dict.fromkeys(names.CE_KEYS) for _ in saes]
    hook = acts.hook

    def splice(sae):
        sae_device = sae.W_dec.device

        def splice_sae(a: Tensor) -> Tensor:
            rec = sae.reconstruct_raw(a[:, 1:].to(sae_device)).to(a.device, a.dtype)
            return torch.cat([a[:, :1], rec], dim=1)

        return splice_sae

    def splice_zero(a: Tensor) -> Tensor:
        return torch.cat([a[:, :1], torch.zeros_like(a[:, 1:])], dim=1)

    ce = {"orig": 0.0, "zero": 0.0}
    ce_sae, kl = [0.0] * len(saes), [0.0] * len(saes)
    count = 0
    for b in range(0, len(eval_ids), ce_batch):
        ids = eval_ids[b : b + ce_batch]
        t = torch.as_tensor(
            np.asarray(tokens)[ids], dtype=torch.long, device=getattr(model, "device", None)
        )
        target = t[:, 2:, None]
        # one pass to the end; each intervention then resumes from the hook (on the model's
        # own forward pass only the blocks after it run again: LoadedModel.spliced)
        logits, act, resume = model.spliced(t, hook)
        lp_orig = _next_token_logprobs(logits)
        del logits
        ce["orig"] += float(-lp_orig.gather(-1, target).sum())
        lp = _next_token_logprobs(resume(splice_zero(act)))
        ce["zero"] += float(-lp.gather(-1, target).sum())
        del lp
        for j, sae in enumerate(saes):
            lp = _next_token_logprobs(resume(splice(sae)(act)))
            ce_sae[j] += float(-lp.gather(-1, target).sum())
            kl[j] += float(F.kl_div(lp, lp_orig, log_target=True, reduction="sum"))
            del lp
        count += target.numel()
        del lp_orig
    orig, zero = ce["orig"] / count, ce["zero"] / count
    denom = zero - orig
    out = []
    for j in range(len(saes)):
        sae_ce = ce_sae[j] / count
        out.append({
            names.CE_LOSS_RECOVERED: (zero - sae_ce) / denom if abs(denom) > 1e-12 else None,
            names.KL_DIV: kl[j] / count,
            names.CE_LOSS_ORIG: orig,
            names.CE_LOSS_SAE: sae_ce,
            names.CE_LOSS_ZERO: zero,
        })
    return out


def _next_token_logprobs(logits: Tensor) -> Tensor:
    """Log-probabilities at positions 1..T−2 (predicting tokens 2..T−1), float32."""
    return torch.log_softmax(logits[:, 1:-1].float(), dim=-1)
