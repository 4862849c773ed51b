"""The Overview's numbers and its one-paragraph reading of the comparison: plain dicts in,
plain rows and a sentence out (no Streamlit), so the wording is unit-tested.

Metric keys are the names in `engine.metrics.names` (METHOD.md §4), the ones `moesae eval`
writes; this module reads no other spelling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from engine.metrics import names

# (column label, metric key, lower is better?)
COLUMNS: list[tuple[str, str, bool | None]] = [
    ("MSE", names.MSE, True),
    ("FVU", names.FVU, True),
    ("L0", names.L0, None),
    ("dead", names.DEAD_FRACTION, True),
    ("CE recovered", names.CE_LOSS_RECOVERED, False),
    (f"redundancy@{names.HEADLINE_TAU}", names.redundancy(names.HEADLINE_TAU), True),
    ("load entropy", names.EXPERT_LOAD_ENTROPY, False),
]


def metric(metrics: Mapping, name: str) -> float | None:
    """metrics[name] when it is a finite number, else None."""
    v = metrics.get(name)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def metrics_rows(saes: Sequence[Mapping]) -> list[dict]:
    """One row per SAE: name, arch, width, experts, k and the COLUMNS (None when unmeasured).
    Each input is {sae, arch, width, experts, active, k, metrics, load_entropy}."""
    rows = []
    for s in saes:
        m = dict(s.get("metrics") or {})
        if s.get("load_entropy") is not None:
            m.setdefault(names.EXPERT_LOAD_ENTROPY, s["load_entropy"])
        row = {
            "SAE": s["sae"],
            "arch": s["arch"],
            "features": s.get("width"),
            "experts": s.get("experts"),
            "active e": s.get("active"),
            "k": s.get("k"),
        }
        for label, key, _ in COLUMNS:
            row[label] = metric(m, key)
        rows.append(row)
    return rows


def reading(rows: Sequence[Mapping]) -> str:
    """One paragraph comparing the SAEs of a build, from `metrics_rows` output."""
    if not rows:
        return "This build holds no SAE."
    if len(rows) == 1:
        r = rows[0]
        parts = [f"This build holds one SAE, {r['SAE']} ({r['arch']}, {r['features']:,} features)."]
        if r.get("FVU") is not None:
            parts.append(f"It leaves {r['FVU']:.1%} of the variance unexplained")
            parts[-1] += (f" with {r['L0']:.0f} active features per token." if r.get("L0") else ".")
        return " ".join(parts)

    sentences = []
    by_arch: dict[str, list[Mapping]] = {}
    for r in rows:
        by_arch.setdefault(str(r["arch"]).lower(), []).append(r)
    switch = by_arch.get("switch", [None])[0]
    scale = by_arch.get("scale", [None])[0]
    if switch is not None and scale is not None:
        same = switch["features"] == scale["features"]
        width = f"at the same width ({switch['features']:,} features)" if same else (
            f"({scale['features']:,} vs {switch['features']:,} features)"
        )
        rs, rw = scale.get("redundancy@0.9"), switch.get("redundancy@0.9")
        if rs is not None and rw is not None:
            if rs <= 0 and rw <= 0:
                sentences.append(
                    f"Neither {scale['SAE']} (Scale) nor {switch['SAE']} (Switch) has duplicate "
                    f"features at cosine 0.9 {width}; duplicates only appear after a few million "
                    "training tokens (METHOD.md), so this run may be too short to separate them."
                )
            elif rs <= 0:
                sentences.append(
                    f"{scale['SAE']} (Scale) has no duplicate features at cosine 0.9, against "
                    f"{rw:.2%} of features for {switch['SAE']} (Switch) {width}."
                )
            else:
                times = rw / rs
                words = f"{times:.1f}× fewer" if times >= 1 else f"{1 / times:.1f}× more"
                sentences.append(
                    f"{scale['SAE']} (Scale) has {words} duplicate features than "
                    f"{switch['SAE']} (Switch) {width}: redundancy@0.9 {rs:.2%} vs {rw:.2%}."
                )
        ms, mw = scale.get("MSE"), switch.get("MSE")
        if ms is not None and mw is not None and mw > 0:
            delta = (ms - mw) / mw
            sentences.append(
                f"Its reconstruction MSE is {abs(delta):.0%} {'lower' if delta < 0 else 'higher'} "
                f"({ms:.4g} vs {mw:.4g})."
            )
    scored = [r for r in rows if r.get("FVU") is not None]
    if len(scored) >= 2:
        best = min(scored, key=lambda r: r["FVU"])
        worst = max(scored, key=lambda r: r["FVU"])
        sentences.append(
            f"By explained variance {best['SAE']} ({best['arch']}) reconstructs best "
            f"(FVU {best['FVU']:.3f}) and {worst['SAE']} ({worst['arch']}) worst (FVU {worst['FVU']:.3f})."
        )
        if "topk" in by_arch and best["arch"] == "topk":
            sentences.append(
                "Dense TopK winning at equal width is expected: the MoE claim is at equal compute "
                "(each token runs e of N experts)."
            )
    dead = [r for r in rows if (r.get("dead") or 0) > 0.2]
    if dead:
        sentences.append(
            "Many dead features in " + ", ".join(f"{r['SAE']} ({r['dead']:.0%})" for r in dead) + "."
        )
    if not sentences:
        listed = ", ".join(str(r["SAE"]) for r in rows)
        sentences.append(f"This build holds {len(rows)} SAEs ({listed}); no evaluation metrics were recorded.")
    return " ".join(sentences)
