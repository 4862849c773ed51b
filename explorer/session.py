"""What every page shares: the open build, the chosen SAE, and links between pages.

The app script (`app.py`) opens the build and picks the SAE before any page runs; pages ask
here. Deep links are query parameters (`?sae=…&feature=…&expert=…`), so any view can be shared
by copying the address bar.
"""

from __future__ import annotations

import streamlit as st

from .data import Db

# Page files, relative to app.py (what st.page_link / st.switch_page take).
OVERVIEW = "views/overview.py"
EXPERTS = "views/experts.py"
FEATURE_MAP = "views/feature_map.py"
REDUNDANCY = "views/redundancy.py"
COMPARE = "views/compare.py"
FEATURE = "views/feature.py"
INSPECT = "views/inspect_text.py"
SEARCH = "views/search_text.py"
STEERING = "views/steering.py"

STEER_FEATURES = "steer_features"
"""Session key holding the (sae, feature) pairs on the Steering page."""

_DB = "moesae_db"
_SAE = "moesae_sae"


def set_db(db: Db) -> None:
    st.session_state[_DB] = db


def db() -> Db:
    """The open build's cache key (set by app.py before any page runs)."""
    return st.session_state[_DB]


def page_list() -> list:
    """The explorer's pages, in sidebar order (app.py hands these to st.navigation)."""
    return [
        st.Page(OVERVIEW, title="Overview", icon=":material/dashboard:", default=True),
        st.Page(EXPERTS, title="Experts", icon=":material/hub:"),
        st.Page(FEATURE_MAP, title="Feature map", icon=":material/scatter_plot:"),
        st.Page(REDUNDANCY, title="Redundancy", icon=":material/content_copy:"),
        st.Page(COMPARE, title="Compare", icon=":material/compare_arrows:"),
        st.Page(FEATURE, title="Feature", icon=":material/search:"),
        st.Page(SEARCH, title="Search text", icon=":material/manage_search:"),
        st.Page(INSPECT, title="Inspect text", icon=":material/keyboard:"),
        st.Page(STEERING, title="Steering", icon=":material/tune:"),
    ]


def choose_sae(saes: list[dict]) -> dict:
    """The sidebar SAE picker. The `sae` query parameter wins (a shared link), then the last
    choice in this session (sidebar navigation drops query parameters), then the first SAE."""
    names = [s["sae"] for s in saes]
    asked = st.query_params.get("sae")
    if asked in names:
        st.session_state[_SAE] = asked
    current = st.session_state.get(_SAE)
    if current not in names:
        current = names[0]
    choice = st.sidebar.selectbox(
        "SAE", names, index=names.index(current),
        help="Which SAE of this build the pages show. Part of every shared link (?sae=…).",
    )
    s = saes[names.index(choice)]
    moe = f", {s['experts']} experts, e = {s['active']}" if (s.get("experts") or 1) > 1 else ""
    st.sidebar.caption(f"**{choice}** · {s['arch']}, {s['width']:,} features{moe}, k = {s['k']}")
    st.session_state[_SAE] = choice
    st.query_params["sae"] = choice
    return saes[names.index(choice)]


def sae() -> str:
    """The chosen SAE's name."""
    return st.session_state[_SAE]


def int_param(name: str) -> int | None:
    """An integer query parameter, or None when absent or not a number."""
    raw = st.query_params.get(name)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def feature_link(sae: str, f: int, label: str | None = None, help: str | None = None) -> None:
    """A link that opens feature `f` of `sae` on the Feature page."""
    st.page_link(
        FEATURE,
        label=label or f"feature {f}",
        query_params={"sae": sae, "feature": str(int(f))},
        help=help,
    )


def open_feature(sae: str, f: int) -> None:
    """Go to the Feature page for `f` now (used by map selections and buttons)."""
    st.switch_page(FEATURE, query_params={"sae": sae, "feature": str(int(f))})


def add_to_steering(sae: str, f: int) -> None:
    """Put feature `f` of `sae` on the Steering page (idempotent)."""
    chosen = st.session_state.setdefault(STEER_FEATURES, [])
    if (sae, int(f)) not in [(s, int(g)) for s, g in chosen]:
        chosen.append((sae, int(f)))


def steer_feature(sae: str, f: int) -> None:
    """Add `f` to the Steering page and go there."""
    add_to_steering(sae, f)
    st.switch_page(STEERING, query_params={"sae": sae})
