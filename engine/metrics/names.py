"""The names of the METHOD.md §4 metrics: the keys of `moesae eval --json`, of the metrics
stored in a build, and of the training log. The explorer imports them from here (no torch)."""

from __future__ import annotations

TAUS = (0.7, 0.8, 0.9)
"""Redundancy thresholds τ; 0.9 is the headline (METHOD §4)."""
HEADLINE_TAU = 0.9

MSE = "mse"
FVU = "fvu"
EXPLAINED_VARIANCE = "explained_variance"
L0 = "l0"
DEAD_FRACTION = "dead_fraction"
DEAD_FRACTION_TOKENS = "dead_fraction_tokens"
CE_LOSS_RECOVERED = "ce_loss_recovered"
KL_DIV = "kl_div"
CE_LOSS_ORIG = "ce_loss_orig"
CE_LOSS_SAE = "ce_loss_sae"
CE_LOSS_ZERO = "ce_loss_zero"
CE_KEYS = (CE_LOSS_RECOVERED, KL_DIV, CE_LOSS_ORIG, CE_LOSS_SAE, CE_LOSS_ZERO)
MEAN_MAX_COS = "mean_max_cos"
EXPERT_LOAD_TOP1 = "expert_load_top1"
EXPERT_LOAD_TOPK = "expert_load_topk"
EXPERT_LOAD_ENTROPY = "expert_load_entropy"
EXPERT_SIMILARITY = "expert_similarity"
OMEGA = "omega"
N_TOKENS = "n_tokens"

SCOPES = ("all", "within", "across")
"""Which decoder pairs count: any two features, two of the same expert, two of different experts."""


def redundancy(tau: float, scope: str = "all") -> str:
    """The key of redundancy_ratio@τ (METHOD §4), `@` written `_`: `redundancy_ratio_0.9`,
    `redundancy_within_0.9`, `redundancy_across_0.9`."""
    return f"redundancy_{'ratio' if scope == 'all' else scope}_{tau}"


def mean_max_cos(scope: str = "all") -> str:
    return MEAN_MAX_COS if scope == "all" else f"{MEAN_MAX_COS}_{scope}"
