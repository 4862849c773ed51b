"""`evaluate`: every METHOD.md §4 metric of one SAE on held-out activations, as one dict whose
keys are the names in `metrics.names` (`moesae eval --json` prints it as it is)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from ..runtime import RuntimeConfig, resolve
from . import names
from .ce import ce_metrics_many
from .geometry import decoder_metrics
from .reconstruction import reconstruction_metrics


@dataclass
class EvalConfig:
    """How much held-out data the metrics read (`moesae eval`, `analyze` and `build`)."""

    eval_tokens: int = field(default=200_000, metadata={"aliases": ("--max-tokens",)})
    """Held-out tokens for the reconstruction metrics (mse, fvu, l0, expert load)."""
    ce_contexts: int = 64
    """Held-out contexts for CE loss recovered and KL (three model passes each)."""
    dead_eval_tokens: int = 1_000_000
    """Held-out tokens on which a feature must never fire to count as dead (METHOD §4: ≥ 1M where possible)."""
    eval_batch: int = 4096
    """Tokens per SAE forward pass while evaluating."""
    ce_batch: int = 4
    """Contexts per model forward pass for CE/KL."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision of the SAE (--device, --precision)."""


@torch.no_grad()
def evaluate(
    sae, acts: Any, model: Any | None = None, cfg: EvalConfig | None = None,
    progress: bool = False, block: int | None = None,
) -> dict[str, Any]:
    """All METHOD.md §4 metrics of `sae` on the eval split of `acts` (an ActivationStore).

    `model` (a LoadedModel with an LM head) enables the CE/KL metrics; without it those keys
    are None. NaN values are returned as None (valid JSON).
    """
    return evaluate_many([sae], acts, model, cfg, progress, block)[0]


@torch.no_grad()
def evaluate_many(
    saes: list, acts: Any, model: Any | None = None, cfg: EvalConfig | None = None,
    progress: bool = False, block: int | None = None,
) -> list[dict[str, Any]]:
    """`evaluate` of each SAE; the model's own forward passes for CE/KL (the original and the
    zero-ablated one) run once for all of them."""
    if not saes:
        return []
    cfg = cfg or EvalConfig()
    rt = resolve(cfg.runtime)
    for sae in saes:
        sae.to(rt.device).eval()
        if getattr(acts, "d_in", sae.cfg.d_in) != sae.cfg.d_in:
            raise DataError(
                f"The SAE reads d_in={sae.cfg.d_in} but the activations have width {acts.d_in}; "
                "evaluate it on activations from the hook it was trained on."
            )
    ce = [dict.fromkeys(names.CE_KEYS) for _ in saes]
    if model is not None and getattr(model, "has_lm_head", False):
        with rt.autocast():
            ce = ce_metrics_many(saes, acts, model, cfg.ce_contexts, cfg.ce_batch)
    results = []
    for sae, ce_of_sae in zip(saes, ce, strict=True):
        with rt.autocast():
            rec = reconstruction_metrics(
                sae, acts.split("eval"), cfg.eval_tokens, cfg.dead_eval_tokens, cfg.eval_batch,
                progress,
            )
        metrics: dict[str, Any] = {
            k: rec[k] for k in (names.MSE, names.FVU, names.EXPLAINED_VARIANCE, names.L0,
                                names.DEAD_FRACTION, names.DEAD_FRACTION_TOKENS)
        }
        metrics.update(dict.fromkeys(names.CE_KEYS))
        metrics.update(ce_of_sae)
        metrics.update(decoder_metrics(sae, block))
        for k in (names.EXPERT_LOAD_TOP1, names.EXPERT_LOAD_TOPK, names.EXPERT_LOAD_ENTROPY):
            metrics[k] = rec[k]
        omega = getattr(sae, "omega", None)
        metrics[names.OMEGA] = omega.detach().cpu().tolist() if omega is not None else None
        metrics[names.N_TOKENS] = rec[names.N_TOKENS]
        results.append(_json_safe(metrics))
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per scalar metric, one column per evaluated SAE."""
    cols_names = list(results)
    keys: list[str] = []
    for r in results.values():
        keys += [
            k for k, v in r.items() if k not in keys and (v is None or isinstance(v, (int, float)))
        ]
    width = max([len(k) for k in keys] + [6])
    cols = [max(len(nm), 10) for nm in cols_names]
    lines = ["  ".join([" " * width] + [nm.rjust(c) for nm, c in zip(cols_names, cols, strict=True)])]
    for k in keys:
        cells = [_fmt(results[nm].get(k)).rjust(c) for nm, c in zip(cols_names, cols, strict=True)]
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


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
