"""METHOD.md §4 metrics for one SAE on held-out activations.

Everything that needs tokens streams over the evaluation split chunk by chunk (never all in
RAM). Redundancy and expert similarity need only the decoder: one blocked pass over the
cosine-similarity matrix gives, for every feature, its max cosine to each expert (an [M, N]
table), from which the overall / within / across max cosines and the N×N similarity heatmap
all follow.

The keys of the dict `evaluate` returns are the metric names of METHOD.md §4 (plus the
within/across variants and `n_tokens`); `moesae eval --json` prints it as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError
from .sae import SparseAutoencoder

TAUS = (0.7, 0.8, 0.9)
"""Redundancy thresholds; 0.9 is the headline (METHOD §4)."""

CE_KEYS = ("ce_loss_recovered", "kl_div", "ce_loss_orig", "ce_loss_sae", "ce_loss_zero")


# -- decoder geometry (pure functions) ---------------------------------------------------------
class MaxCosine(NamedTuple):
    overall: Tensor
    """[M] each feature's max cosine to any other feature."""
    within: Tensor | None
    """[M] max cosine to another feature of the same expert (NaN if it is alone); None if no groups."""
    across: Tensor | None
    """[M] max cosine to a feature of another expert (NaN if there is none); None if no groups."""


def _auto_block(M: int) -> int:
    # Keep one [block, M] float32 similarity slab near 64 MB, whatever the width.
    return max(1, min(M, 2**24 // max(M, 1)))


def max_cos_per_expert(
    W_dec: Tensor,
    groups: Tensor | None = None,
    n_groups: int | None = None,
    block: int | None = None,
) -> Tensor:
    """[M, N] max cosine of each feature to the features of each group, self-pairs excluded.

    Decoder rows are unit-normalised; the M×M cosine matrix is computed `block` rows at a
    time, so memory is O(block · M + M · N). Entries with no eligible partner are −inf.
    """
    W = W_dec.detach().float()
    M = W.shape[0]
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if groups is None:
        groups = torch.zeros(M, dtype=torch.long, device=W.device)
        n_groups = 1
    groups = groups.to(W.device).long()
    N = int(n_groups if n_groups is not None else int(groups.max()) + 1)
    block = block or _auto_block(M)
    # Our SAEs give expert i the contiguous rows [i·m, (i+1)·m): a reshape replaces the scatter.
    m = M // N
    contiguous = M == N * m and torch.equal(groups, torch.arange(M, device=W.device) // m)
    out = torch.empty(M, N, dtype=torch.float32, device=W.device)
    for start in range(0, M, block):
        stop = min(start + block, M)
        S = Wn[start:stop] @ Wn.T  # [b, M]
        rows = torch.arange(stop - start, device=W.device)
        S[rows, rows + start] = -math.inf  # a feature is not its own neighbour
        if contiguous:
            out[start:stop] = S.view(stop - start, N, m).amax(-1)
        else:
            slab = torch.full((stop - start, N), -math.inf, device=W.device)
            idx = groups[None, :].expand(stop - start, M)
            out[start:stop] = slab.scatter_reduce(1, idx, S, reduce="amax", include_self=True)
    return out


def max_cosine(
    W_dec: Tensor,
    groups: Tensor | None = None,
    block: int | None = None,
    per_expert: Tensor | None = None,
) -> MaxCosine:
    """Per-feature max cosine overall, within its expert and across experts (METHOD §4)."""
    if per_expert is None:
        n = None if groups is None else int(groups.max()) + 1
        per_expert = max_cos_per_expert(W_dec, groups, n, block)
    overall = _nan_if_inf(per_expert.amax(1))
    if groups is None:
        return MaxCosine(overall, None, None)
    own = groups.to(per_expert.device).long()[:, None]
    within = per_expert.gather(1, own).squeeze(1)
    across = per_expert.scatter(1, own, -math.inf).amax(1)
    return MaxCosine(overall, _nan_if_inf(within), _nan_if_inf(across))


def redundancy_ratio(maxcos: Tensor, tau: float) -> float:
    """Fraction of features whose max cosine is above τ (features without a partner excluded)."""
    valid = ~torch.isnan(maxcos)
    if not bool(valid.any()):
        return math.nan
    return float((maxcos[valid] > tau).float().mean())


def expert_similarity(
    W_dec: Tensor,
    feature_expert: Tensor,
    N: int,
    block: int | None = None,
    per_expert: Tensor | None = None,
) -> Tensor:
    """[N, N]: [i, j] = mean over features of expert i of their max cosine to expert j's features.

    The diagonal excludes self-pairs; an expert with a single feature has NaN on the diagonal.
    """
    if per_expert is None:
        per_expert = max_cos_per_expert(W_dec, feature_expert, N, block)
    fe = feature_expert.to(per_expert.device).long()
    P = _nan_if_inf(per_expert).double()
    sums = torch.zeros(N, N, dtype=torch.float64, device=P.device).index_add_(0, fe, P)
    counts = torch.bincount(fe, minlength=N).double()
    return (sums / counts[:, None]).float()


def load_entropy(load: Tensor | list[float]) -> float | None:
    """Entropy of an expert-load distribution divided by log N (1 = perfectly balanced)."""
    p = torch.as_tensor(load, dtype=torch.float64)
    if p.numel() < 2:
        return None
    p = p / p.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(p.numel()))


def _nan_if_inf(x: Tensor) -> Tensor:
    return torch.where(torch.isinf(x), torch.full_like(x, math.nan), x)


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    acts: Any,
    model: Any | None = None,
    max_tokens: int | None = 1_000_000,
    ce_contexts: int = 64,
    batch: int = 4096,
    ce_batch: int = 4,
    block: int | None = None,
    progress: bool = False,
    dead_tokens: int | None = 1_000_000,
) -> dict[str, Any]:
    """All METHOD.md §4 metrics of `sae` on the eval split of `acts` (an ActivationStore).

    `model` (a LoadedModel with an LM head) enables the CE/KL metrics on up to `ce_contexts`
    eval contexts; without it those keys are None. Reconstruction metrics use up to
    `max_tokens` held-out tokens; `dead_fraction` counts firings over up to `dead_tokens`
    (reported as `dead_fraction_tokens`). NaN values are returned as None (valid JSON).
    """
    sae.eval()
    device = sae.W_dec.device
    M, N = sae.cfg.width, sae.cfg.experts
    if getattr(acts, "d_in", sae.cfg.d_in) != sae.cfg.d_in:
        raise DataError(
            f"The SAE reads d_in={sae.cfg.d_in} but the activations have width {acts.d_in}; "
            "evaluate it on activations from the hook it was trained on."
        )
    eval_set = acts.split("eval")
    total = eval_set.n_tokens if max_tokens is None else min(eval_set.n_tokens, max_tokens)
    if total <= 0:
        raise DataError(
            "The activation folder has no evaluation tokens; harvest with a non-zero eval fraction."
        )

    n = 0
    sse = 0.0  # Σ‖x − x̂‖² in raw units
    shift: Tensor | None = None  # first chunk's mean, subtracted to keep the variance sum stable
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    sum_sq = 0.0
    active = 0
    fired = torch.zeros(M, dtype=torch.bool, device=device)
    top1 = torch.zeros(N, dtype=torch.float64, device=device)
    topk = torch.zeros(N, dtype=torch.float64, device=device)
    # dead_fraction wants as many tokens as possible (METHOD §4: ≥ 1M where possible), more
    # than the reconstruction metrics need: past `total`, chunks are only encoded.
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
    metrics: dict[str, Any] = {
        "mse": sse / n,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": active / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "dead_fraction_tokens": n_dead,
    }
    metrics.update(dict.fromkeys(CE_KEYS))
    if model is not None and getattr(model, "has_lm_head", False):
        metrics.update(ce_metrics(sae, acts, model, ce_contexts, ce_batch))
    metrics.update(decoder_metrics(sae, block))
    metrics["expert_load_top1"] = load1.tolist()
    metrics["expert_load_topk"] = loadk.tolist()
    metrics["expert_load_entropy"] = load_entropy(load1)
    omega = getattr(sae, "omega", None)
    metrics["omega"] = omega.detach().cpu().tolist() if omega is not None else None
    metrics["n_tokens"] = n
    return _json_safe(metrics)


def decoder_metrics(sae: SparseAutoencoder, block: int | None = None) -> dict[str, Any]:
    """Redundancy (overall / within / across at each τ), mean max cos and expert similarity."""
    N = sae.cfg.experts
    groups = sae.feature_expert() if N > 1 else None
    per_expert = max_cos_per_expert(sae.W_dec, groups, N if groups is not None else 1, block)
    mc = max_cosine(sae.W_dec, groups, per_expert=per_expert)
    # Dense TopK is a single expert: every pair is "within", none is "across".
    within = mc.within if mc.within is not None else mc.overall
    out: dict[str, Any] = {}
    for tau in TAUS:
        out[f"redundancy_ratio_{tau}"] = redundancy_ratio(mc.overall, tau)
        out[f"redundancy_within_{tau}"] = redundancy_ratio(within, tau)
        out[f"redundancy_across_{tau}"] = (
            redundancy_ratio(mc.across, tau) if mc.across is not None else None
        )
    out["mean_max_cos"] = _nanmean(mc.overall)
    out["mean_max_cos_within"] = _nanmean(within)
    out["mean_max_cos_across"] = _nanmean(mc.across) if mc.across is not None else None
    fe = groups if groups is not None else torch.zeros(sae.cfg.width, dtype=torch.long)
    out["expert_similarity"] = expert_similarity(sae.W_dec, fe, N, per_expert=per_expert).tolist()
    return out


@torch.no_grad()
def ce_metrics(
    sae: SparseAutoencoder, acts: Any, model: Any, ce_contexts: int = 64, ce_batch: int = 4
) -> dict[str, Any]:
    """CE with x̂ spliced in at the hook, with zero-ablation, and without intervention; KL.

    Position 0 (BOS, or the attention-sink first token; never in the SAE's training data) keeps
    its original activation in both interventions, and the losses are taken on the predictions
    made at positions 1..T−2, the ones whose hook activation was replaced.
    """
    tokens, _, split = acts.contexts()
    eval_ids = eval_context_ids(split)[:ce_contexts]
    if not eval_ids or np.asarray(tokens).shape[1] < 3:
        return dict.fromkeys(CE_KEYS)
    hook = acts.hook
    sae_device = sae.W_dec.device

    def splice_sae(a: Tensor) -> Tensor:
        rec = sae.reconstruct_raw(a[:, 1:].to(sae_device)).to(a.device, a.dtype)
        return torch.cat([a[:, :1], rec], dim=1)

    def splice_zero(a: Tensor) -> Tensor:
        return torch.cat([a[:, :1], torch.zeros_like(a[:, 1:])], dim=1)

    ce = {"orig": 0.0, "sae": 0.0, "zero": 0.0}
    kl = 0.0
    count = 0
    for b in range(0, len(eval_ids), ce_batch):
        ids = eval_ids[b : b + ce_batch]
        t = torch.as_tensor(
            np.asarray(tokens)[ids], dtype=torch.long, device=getattr(model, "device", None)
        )
        target = t[:, 2:]
        lp_orig = _next_token_logprobs(model.logits(t))
        ce["orig"] += float(-lp_orig.gather(-1, target[..., None]).sum())
        for name, fn in (("sae", splice_sae), ("zero", splice_zero)):
            lp = _next_token_logprobs(model.logits_with_hook(t, hook, fn))
            ce[name] += float(-lp.gather(-1, target[..., None]).sum())
            if name == "sae":
                kl += float(F.kl_div(lp, lp_orig, log_target=True, reduction="sum"))
            del lp
        count += target.numel()
        del lp_orig
    ce = {k: v / count for k, v in ce.items()}
    denom = ce["zero"] - ce["orig"]
    recovered = (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-12 else None
    return {
        "ce_loss_recovered": recovered,
        "kl_div": kl / count,
        "ce_loss_orig": ce["orig"],
        "ce_loss_sae": ce["sae"],
        "ce_loss_zero": ce["zero"],
    }


def _next_token_logprobs(logits: Tensor) -> Tensor:
    """Log-probabilities at positions 1..T−2 (predicting tokens 2..T−1), float32."""
    return torch.log_softmax(logits[:, 1:-1].float(), dim=-1)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per scalar metric, one column per evaluated SAE."""
    names = list(results)
    keys: list[str] = []
    for r in results.values():
        keys += [
            k for k, v in r.items() if k not in keys and (v is None or isinstance(v, (int, float)))
        ]
    width = max([len(k) for k in keys] + [6])
    cols = [max(len(nm), 10) for nm in names]
    lines = ["  ".join([" " * width] + [nm.rjust(c) for nm, c in zip(names, cols, strict=True)])]
    for k in keys:
        cells = [_fmt(results[nm].get(k)).rjust(c) for nm, c in zip(names, cols, strict=True)]
        lines.append("  ".join([k.ljust(width)] + cells))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


def _nanmean(x: Tensor) -> float:
    valid = x[~torch.isnan(x)]
    return float(valid.mean()) if valid.numel() else math.nan


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True)


def eval_context_ids(split: Iterable[str]) -> list[int]:
    """Indices of the contexts in the eval split (order preserved)."""
    return [i for i, s in enumerate(split) if s == "eval"]
