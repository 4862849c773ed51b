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


def curve_label(key: str, log: Sequence[Mapping], dead_tokens: int | None = None) -> str:
    """What a training-log curve shows, with its unit (the Metrics table's MSE is in the model's
    units; logs written before mse_unit existed hold the SAE's normalised units)."""
    if key == names.MSE:
        model = any(r.get("mse_unit") == "model" for r in log)
        return "MSE per token (model units)" if model else "MSE per token (SAE input units)"
    if key == names.DEAD_FRACTION:
        if dead_tokens:
            return f"dead fraction (no fire in the last {dead_tokens:,} training tokens)"
        return "dead fraction (no recent fire in training)"
    return {
        names.FVU: "FVU (fraction of variance unexplained)",
        names.L0: "L0 (active features per token)",
        names.EXPERT_LOAD_ENTROPY: "expert load entropy (÷ log N; 1 = balanced)",
        "loss": "training objective (SAE input units)",
        "lb_loss": "load-balance loss",
        "auxk_loss": "AuxK loss",
        "tokens_per_s": "training speed (tokens/s)",
    }.get(key, key)


def metric(metrics: Mapping, name: str) -> float | None:
    """metrics[name] when it is a finite number, else None."""
    v = metrics.get(name)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def role(arch: str, active: int | None) -> str:
    """What an SAE is in the paper's comparison, in words (the README names the same)."""
    arch = str(arch).lower()
    if arch == "switch":
        return "Switch SAE (the original: router-probability scaling)"
    if arch == "scale" and (active or 1) == 1:
        return "the authors' Switch stand-in (their Scale code with e = 1)"
    if arch == "scale":
        return f"Scale SAE, e = {active}"
    if arch == "topk":
        return "dense TopK"
    return arch


def metrics_rows(saes: Sequence[Mapping]) -> list[dict]:
    """One row per SAE: name, what it is, width, experts, k and the COLUMNS (None when
    unmeasured). Each input is {sae, arch, width, experts, active, k, metrics, load_entropy}."""
    rows = []
    for s in saes:
        m = dict(s.get("metrics") or {})
        if s.get("load_entropy") is not None:
            m.setdefault(names.EXPERT_LOAD_ENTROPY, s["load_entropy"])
        row = {
            "SAE": s["sae"],
            "arch": s["arch"],
            "what it is": role(s["arch"], s.get("active")),
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
    scales = [r for r in by_arch.get("scale", []) if (r.get("active e") or 1) > 1]
    scale = min(scales, key=lambda r: r.get("active e") or 0) if scales else None
    standin = next((r for r in by_arch.get("scale", []) if (r.get("active e") or 1) == 1), None)
    red = f"redundancy@{names.HEADLINE_TAU}"
    if switch is not None and scale is not None:
        sentences += _compare(scale, f"Scale e={scale['active e']}", switch, "Switch", red)
    if standin is not None and (switch is not None or scale is not None):
        other = scale if scale is not None else switch
        label = f"Scale e={other['active e']}" if other is scale else "Switch"
        sentences += _compare(other, label, standin, "the authors' stand-in", red)
    if switch is not None and standin is not None:
        sentences.append(
            f"{switch['SAE']} is the original Switch SAE (its router is trained by reconstruction "
            f"through p_i*); {standin['SAE']} is the baseline the paper calls Switch, whose "
            "router learns only from load balancing."
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


def _compare(a: Mapping, a_label: str, b: Mapping, b_label: str, red: str) -> list[str]:
    """Two sentences comparing SAE a with SAE b: duplicates, then reconstruction, both named."""
    same = a["features"] == b["features"]
    width = f"at the same width ({a['features']:,} features)" if same else (
        f"({a['features']:,} vs {b['features']:,} features)"
    )
    out = []
    ra, rb = a.get(red), b.get(red)
    if ra is not None and rb is not None:
        if ra <= 0 and rb <= 0:
            out.append(
                f"Neither {a['SAE']} ({a_label}) nor {b['SAE']} ({b_label}) has duplicate features "
                f"at cosine 0.9 {width}; duplicates only appear after a few million training "
                "tokens, so this run may be too short to separate them."
            )
        elif ra <= 0:
            out.append(f"{a['SAE']} ({a_label}) has no duplicate features at cosine 0.9, against "
                       f"{rb:.2%} of features for {b['SAE']} ({b_label}) {width}.")
        else:
            times = rb / ra
            words = f"{times:.1f}× fewer" if times >= 1 else f"{1 / times:.1f}× more"
            out.append(f"{a['SAE']} ({a_label}) has {words} duplicate features than {b['SAE']} "
                       f"({b_label}) {width}: {red} {ra:.2%} vs {rb:.2%}.")
    ma, mb = a.get("MSE"), b.get("MSE")
    if ma is not None and mb is not None and mb > 0:
        delta = (ma - mb) / mb
        out.append(f"The reconstruction MSE of {a['SAE']} is {abs(delta):.0%} "
                   f"{'lower' if delta < 0 else 'higher'} than that of {b['SAE']} "
                   f"({ma:.4g} vs {mb:.4g}, in the model's units).")
    return out
