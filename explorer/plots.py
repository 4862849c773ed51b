"""Plot builders: plain lists / dicts / numpy arrays in, a plotly Figure out. No Streamlit and no
store access here, so each builder can be tested and reused on its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .render import PALETTE, expert_color

_MARGIN = dict(l=10, r=10, t=40, b=10)
# PALETTE as a colour scale with one flat step per colour (integer code i → PALETTE[i]).
_STEPPED = [
    [min(1.0, (i + d) / len(PALETTE)), c] for i, c in enumerate(PALETTE) for d in (0, 1)
]


def _layout(fig: go.Figure, title: str, height: int = 340, **kw) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=_MARGIN, **kw)
    return fig


def training_curves(
    logs: Mapping[str, Sequence[Mapping[str, float]]], metric: str, x: str = "step",
    title: str | None = None,
) -> go.Figure:
    """One line per SAE: `logs[name]` is its list of log records (dicts with `x` and `metric`)."""
    fig = go.Figure()
    for i, (name, rows) in enumerate(logs.items()):
        pts = [(r[x], r[metric]) for r in rows if r.get(metric) is not None and r.get(x) is not None]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        fig.add_trace(
            go.Scatter(x=xs, y=ys, mode="lines", name=name, line=dict(color=PALETTE[i % len(PALETTE)]))
        )
    return _layout(fig, title or metric, xaxis_title=x, legend=dict(orientation="h", y=-0.2))


def expert_load(
    load_top1: Sequence[float], load_tope: Sequence[float] | None = None, title: str = "Expert load"
) -> go.Figure:
    """Fraction of tokens per expert, top-1 and (when routing picks several) top-e; a dashed
    line marks the uniform load 1/N."""
    n = len(load_top1)
    experts = list(range(n))
    fig = go.Figure(
        go.Bar(x=experts, y=list(load_top1), name="top-1", marker_color=[expert_color(e) for e in experts])
    )
    if load_tope is not None:
        fig.add_trace(
            go.Bar(x=experts, y=list(load_tope), name="top-e", marker_color="rgba(80,80,80,0.35)")
        )
    if n:
        fig.add_hline(y=1 / n, line_dash="dash", line_color="#888", annotation_text="uniform")
    return _layout(fig, title, xaxis_title="expert", yaxis_title="fraction of tokens", barmode="group")


def per_expert_bar(values: Sequence[float], title: str, y_title: str) -> go.Figure:
    """One bar per expert in its colour (router entropy, ω, …)."""
    experts = list(range(len(values)))
    fig = go.Figure(
        go.Bar(x=experts, y=list(values), marker_color=[expert_color(e) for e in experts])
    )
    return _layout(fig, title, xaxis_title="expert", yaxis_title=y_title)


def heatmap(
    matrix: np.ndarray | Sequence[Sequence[float]],
    x_labels: Sequence[str | int],
    y_labels: Sequence[str | int],
    title: str,
    x_title: str = "",
    y_title: str = "",
    colorscale: str = "Viridis",
    zmin: float | None = None,
    zmax: float | None = None,
    height: int = 420,
) -> go.Figure:
    """A labelled heatmap (domain × expert load, expert × expert similarity)."""
    z = np.asarray(matrix, dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(v) for v in x_labels],
            y=[str(v) for v in y_labels],
            colorscale=colorscale,
            zmin=zmin,
            zmax=zmax,
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:.3f}}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return _layout(fig, title, height=height, xaxis_title=x_title, yaxis_title=y_title)


def histogram(
    counts: Sequence[float],
    edges: Sequence[float],
    title: str,
    x_title: str,
    log_y: bool = False,
    marker: float | None = None,
    color: str = "#4e79a7",
    height: int = 300,
) -> go.Figure:
    """A histogram from pre-binned counts (len(edges) = len(counts) + 1); `marker` draws a
    vertical line (a threshold)."""
    e = np.asarray(edges, dtype=float)
    fig = go.Figure(
        go.Bar(
            x=(e[:-1] + e[1:]) / 2,
            y=list(counts),
            width=np.diff(e),
            marker_color=color,
            hovertemplate="%{x:.3g}: %{y}<extra></extra>",
        )
    )
    if marker is not None:
        fig.add_vline(x=marker, line_dash="dash", line_color="#d62728")
    fig.update_layout(bargap=0)
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title, height=height, xaxis_title=x_title, yaxis_title="count")


def bin_values(values: np.ndarray, bins: int = 50, lo: float | None = None, hi: float | None = None):
    """(counts, edges) of `values`: the histogram builders take pre-binned data."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros(bins), np.linspace(0.0, 1.0, bins + 1)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1e-6
    return np.histogram(v, bins=bins, range=(lo, hi))


def logit_effects(
    pos_tokens: Sequence[str],
    pos_values: Sequence[float],
    neg_tokens: Sequence[str],
    neg_values: Sequence[float],
) -> go.Figure:
    """Horizontal bars: the tokens a feature pushes up (right) and down (left)."""
    toks = [repr(t)[1:-1] for t in list(neg_tokens)[::-1]] + [repr(t)[1:-1] for t in pos_tokens]
    vals = [float(v) for v in list(neg_values)[::-1]] + [float(v) for v in pos_values]
    fig = go.Figure(
        go.Bar(
            x=vals,
            y=[f"{i:02d} {t}" for i, t in enumerate(toks)],
            orientation="h",
            marker_color=["#e15759" if v < 0 else "#59a14f" for v in vals],
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(
        tickmode="array", tickvals=[f"{i:02d} {t}" for i, t in enumerate(toks)], ticktext=toks
    )
    return _layout(fig, "Logit effects", height=max(260, 18 * len(toks) + 80))


def feature_map(
    x: np.ndarray,
    y: np.ndarray,
    feature_ids: np.ndarray,
    color: np.ndarray,
    color_mode: str,
    hover: Sequence[str] | None = None,
    highlight: np.ndarray | None = None,
    categories: Sequence[str] | None = None,
    height: int = 640,
) -> go.Figure:
    """UMAP scatter of features as one WebGL trace (fast for 10⁵ points).

    color_mode "expert" or "domain": `color` holds integer category codes (names in
    `categories` for domains) and get the shared palette; "density": `color` is a float
    (log10 firing density) on a continuous scale. `highlight` (bool mask) draws the matches
    of a search on top, larger and outlined. Every point carries its feature id in customdata,
    so a selection can be mapped back to features.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ids = np.asarray(feature_ids)
    if color_mode == "density":
        marker = dict(
            size=3,
            color=np.asarray(color, dtype=np.float32),
            colorscale="Viridis",
            colorbar=dict(title="log10 density", thickness=12),
            showscale=True,
        )
    else:
        # Integer codes on a stepped colour scale: plotly validates 10⁵ colour strings
        # one by one (seconds), numbers in bulk (milliseconds).
        codes = np.asarray(color, dtype=np.int64) % len(PALETTE)
        marker = dict(size=4, color=codes, colorscale=_STEPPED, cmin=-0.5,
                      cmax=len(PALETTE) - 0.5, showscale=False)
    hover_t = "feature %{customdata}<extra></extra>"
    if hover is not None:
        hover_t = "feature %{customdata}<br>%{text}<extra></extra>"
    faded = highlight is not None and bool(np.any(highlight))
    if faded:
        marker["opacity"] = 0.25
    fig = go.Figure(
        go.Scattergl(
            x=x,
            y=y,
            mode="markers",
            marker=marker,
            customdata=ids,
            text=None if hover is None else np.asarray(hover, dtype=object),
            hovertemplate=hover_t,
            name="features",
            showlegend=False,
        )
    )
    if faded:
        m = np.asarray(highlight, dtype=bool)
        fig.add_trace(
            go.Scattergl(
                x=x[m],
                y=y[m],
                mode="markers",
                marker=dict(size=8, color="#d62728", line=dict(width=1, color="#222")),
                customdata=ids[m],
                text=None if hover is None else np.asarray(hover, dtype=object)[m],
                hovertemplate=hover_t,
                name="matches",
                showlegend=False,
            )
        )
    if color_mode in ("expert", "domain"):
        # Legend entries only (empty traces), so the big trace stays a single WebGL draw call.
        codes = np.unique(np.asarray(color, dtype=np.int64))
        if len(codes) <= len(PALETTE):
            for c in codes:
                label = categories[c] if categories is not None and c < len(categories) else f"expert {c}"
                fig.add_trace(
                    go.Scattergl(
                        x=[None], y=[None], mode="markers", name=str(label),
                        marker=dict(size=8, color=PALETTE[int(c) % len(PALETTE)]),
                    )
                )  # fmt: skip
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=10, b=10),
        dragmode="pan",
        clickmode="event+select",  # a click selects the point (Streamlit reruns with it)
        xaxis=dict(showticklabels=False, title=None, zeroline=False),
        yaxis=dict(showticklabels=False, title=None, zeroline=False),
        # below the plot: on the right the mode bar (zoom, pan …) covers the legend's top
        legend=dict(itemsizing="constant", orientation="h", yanchor="top", y=-0.01, x=0),
        # an opaque, readable hover box (by default it takes the point's colour and opacity)
        hoverlabel=dict(bgcolor="white", bordercolor="#444", font=dict(size=14, color="#111"),
                        align="left"),
        uirevision="feature-map",
    )
    return fig



def overlaid_histograms(series: Mapping[str, np.ndarray], title: str, x_title: str, bins: int = 50,
                        lo: float = -0.2, hi: float = 1.0, marker: float | None = None,
                        height: int = 320) -> go.Figure:
    """Several distributions on one pair of axes (shared bins), each in its own colour."""
    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        counts, edges = bin_values(values, bins=bins, lo=lo, hi=hi)
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=name,
                             marker_color=PALETTE[i % len(PALETTE)], opacity=0.6,
                             hovertemplate=f"{name}<br>%{{x:.2f}}: %{{y}}<extra></extra>"))
    if marker is not None:
        fig.add_vline(x=marker, line_dash="dash", line_color="#d62728")
    fig.update_layout(barmode="overlay", bargap=0, legend=dict(orientation="h", y=-0.25))
    return _layout(fig, title, height=height, xaxis_title=x_title, yaxis_title="features")
