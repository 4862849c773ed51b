"""Reconstruction metrics over held-out tokens, streamed chunk by chunk (never all in RAM):
mse, fvu, explained variance, l0, dead fraction and expert load (METHOD.md §4)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from . import names
from .load import load_entropy


@torch.no_grad()
def reconstruction_metrics(
    sae, eval_set, max_tokens: int | None, dead_tokens: int | None, batch: int, progress: bool
) -> dict[str, Any]:
    """Metrics of `sae` on `eval_set` (a TokenSet of raw activations).

    Reconstruction metrics use up to `max_tokens` tokens; `dead_fraction` counts firings
    over up to `dead_tokens` (reported as `dead_fraction_tokens`), since METHOD §4 wants as
    many tokens as possible there (≥ 1M): past `max_tokens`, chunks are only encoded.
    """
    device = sae.W_dec.device
    M, N = sae.cfg.width, sae.cfg.experts
    total = eval_set.n_tokens if max_tokens is None else min(eval_set.n_tokens, max_tokens)
    if total <= 0:
        raise DataError(
            "The activation folder has no evaluation tokens; harvest with a non-zero eval fraction."
        )
    n = 0
    sse = 0.0  # Σ‖x − x̂‖² in raw units
    shift = None  # first chunk's mean, subtracted to keep the variance sum stable
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    sum_sq = 0.0
    active = 0
    fired = torch.zeros(M, dtype=torch.bool, device=device)
    top1 = torch.zeros(N, dtype=torch.float64, device=device)
    topk = torch.zeros(N, dtype=torch.float64, device=device)
    dead_cap = min(eval_set.n_tokens, max(total, dead_tokens or 0))
    n_dead = 0
    bar = _progress(dead_cap, "eval", progress)
    for _, chunk in eval_set.iter_chunks(batch):
        if n_dead >= dead_cap:
            break
        arr = np.asarray(chunk[: dead_cap - n_dead])
        head = arr[: max(total - n, 0)]
        if len(head):
            x = torch.as_tensor(head, dtype=torch.float32, device=device)
            out = sae(sae.normalise(x))
            x_hat = sae.denormalise(out.x_hat)
            sse += float((x - x_hat).double().pow(2).sum())
            if shift is None:
                shift = x.double().mean(0)
            xc = x.double() - shift
            sum_x += xc.sum(0)
            sum_sq += float(xc.pow(2).sum())
            codes = out.codes
            on = codes.top_acts > 0
            active += int(on.sum())
            fired[codes.top_indices[on]] = True
            if codes.expert_indices is not None:
                ei = codes.expert_indices
                top1 += torch.bincount(ei[:, 0], minlength=N).double()
                topk += torch.bincount(ei.reshape(-1), minlength=N).double()
            else:
                top1[0] += x.shape[0]
                topk[0] += x.shape[0]
            n += x.shape[0]
        tail = arr[len(head):]
        if len(tail):
            codes = sae.encode(sae.normalise(torch.as_tensor(tail, dtype=torch.float32, device=device)))
            fired[codes.top_indices[codes.top_acts > 0]] = True
        n_dead += len(arr)
        if bar is not None:
            bar.update(len(arr))
    if bar is not None:
        bar.close()
    if n == 0:
        raise DataError(
            "The activation folder has no evaluation tokens; harvest with a non-zero eval fraction."
        )
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    fvu = sse / total_var if total_var > 0 else math.nan
    load1 = top1 / top1.sum()
    loadk = topk / topk.sum()
    return {
        names.MSE: sse / n,
        names.FVU: fvu,
        names.EXPLAINED_VARIANCE: 1.0 - fvu,
        names.L0: active / n,
        names.DEAD_FRACTION: 1.0 - float(fired.float().mean()),
        names.DEAD_FRACTION_TOKENS: n_dead,
        names.EXPERT_LOAD_TOP1: load1.tolist(),
        names.EXPERT_LOAD_TOPK: loadk.tolist(),
        names.EXPERT_LOAD_ENTROPY: load_entropy(load1),
        names.N_TOKENS: n,
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True)
