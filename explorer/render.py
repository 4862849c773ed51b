"""Token-highlight rendering: plain lists in, an HTML string out (shown with
`st.html` / `st.markdown(unsafe_allow_html=True)`). Every token's text goes through
`html.escape`, because model vocabularies contain `<`, `&` and quotes."""

from __future__ import annotations

import html
from collections.abc import Sequence

# 64 expert colours, every two at least 14 apart in CIELAB (ΔE): the Tableau 10 first (what
# small builds show), then plotly's Dark24, Alphabet and Light24 with near-duplicates removed.
# Beyond 64 experts colours repeat; every hover and tooltip names the expert as well.
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#2e91e5", "#e15f99", "#1ca71c", "#fb0d0d", "#da16ff", "#222a2a",
    "#b68100", "#750d86", "#eb663b", "#511cfb", "#00a08b", "#fb00d1", "#fc0080", "#b2828d",
    "#6c7c32", "#862a16", "#a777f1", "#620042", "#1616a7", "#da60ca", "#6c4516", "#0d2a63",
    "#af0038", "#aa0dfe", "#3283fe", "#85660d", "#782ab6", "#565656", "#1c8356", "#16ff32",
    "#f7e1a0", "#e2e2e2", "#1cbe4f", "#dea0fd", "#325a9b", "#feaf16", "#90ad1c", "#f6222e",
    "#1cffce", "#2ed9ff", "#b10da1", "#b00068", "#fbe426", "#6a76fc", "#fed4c4", "#0df9ff",
    "#6e899c", "#00b5f7", "#c9fbe5", "#22ffa7", "#e3ee9e", "#86ce00", "#7e7dcd", "#e48f72",
]  # fmt: skip

_BOX = (
    "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.9em; "
    "line-height: 1.9; white-space: pre-wrap; word-break: break-word;"
)
_TOKEN = "border-radius: 3px; padding: 1px 0;"


def expert_color(expert: int) -> str:
    """The colour of one expert, the same on every page and plot."""
    return PALETTE[int(expert) % len(PALETTE)]


def token_text(token: str) -> str:
    """A token as a reader should see it: escaped, with newlines and tabs made visible."""
    shown = token.replace("\n", "↵\n").replace("\t", "⇥")
    return html.escape(shown, quote=True)


def _alpha_hex(alpha: float) -> str:
    return f"{max(0, min(255, round(alpha * 255))):02x}"


def shade_tokens(
    tokens: Sequence[str],
    acts: Sequence[float],
    max_act: float | None = None,
    focus: int | None = None,
    color: str = "#f28e2b",
) -> str:
    """Tokens shaded by activation (0 → clear, max_act → full colour); `focus` underlines the
    token the example was taken at. Hovering a token shows its activation."""
    scale = float(max_act) if max_act else max((float(a) for a in acts), default=0.0)
    scale = scale if scale > 0 else 1.0
    parts = []
    for i, (tok, act) in enumerate(zip(tokens, acts, strict=True)):
        a = float(act)
        style = _TOKEN
        if a > 0:
            style += f" background: {color}{_alpha_hex(0.15 + 0.85 * min(a / scale, 1.0))};"
        if i == focus:
            style += " border-bottom: 2px solid #222; font-weight: 600;"
        parts.append(f'<span style="{style}" title="act {a:.3g}">{token_text(tok)}</span>')
    return f'<div style="{_BOX}">{"".join(parts)}</div>'


def expert_tokens(
    tokens: Sequence[str],
    experts: Sequence[int | Sequence[int]],
    weights: Sequence[float] | None = None,
) -> str:
    """Tokens coloured by the expert each was routed to (the first one when a token went to
    several); the tooltip lists all its experts. `weights` (router prob of the first expert)
    sets the colour strength."""
    parts = []
    for i, tok in enumerate(tokens):
        exps = experts[i]
        exps = [int(e) for e in exps] if isinstance(exps, Sequence) else [int(exps)]
        if not exps:
            parts.append(f'<span style="{_TOKEN}">{token_text(tok)}</span>')
            continue
        strength = 0.75 if weights is None else 0.25 + 0.6 * float(weights[i])
        style = f"{_TOKEN} background: {expert_color(exps[0])}{_alpha_hex(strength)};"
        title = "experts " + ", ".join(str(e) for e in exps)
        parts.append(f'<span style="{style}" title="{title}">{token_text(tok)}</span>')
    return f'<div style="{_BOX}">{"".join(parts)}</div>'


def expert_legend(experts: Sequence[int], label: str = "expert") -> str:
    """A row of coloured chips naming each expert shown."""
    chips = [
        f'<span style="{_TOKEN} padding: 1px 6px; margin-right: 4px; '
        f'background: {expert_color(e)}bf;">{html.escape(label)} {int(e)}</span>'
        for e in sorted({int(e) for e in experts})
    ]
    return f'<div style="font-size: 0.85em; line-height: 2;">{"".join(chips)}</div>'


def token_chips(tokens: Sequence[str], values: Sequence[float] | None = None) -> str:
    """Inline chips for a list of tokens (top tokens, logit tokens), with optional values."""
    chips = []
    for i, tok in enumerate(tokens):
        val = "" if values is None else f' <small style="opacity:.6">{float(values[i]):+.2f}</small>'
        chips.append(
            f'<code style="margin-right: 6px;">{token_text(tok)}</code>{val}'
        )
    return f'<div style="line-height: 2;">{"".join(chips)}</div>'
