"""Feature map: every feature of the SAE on its UMAP (or PCA) map. Hover shows top tokens,
clicking a point opens its feature page, the search box highlights matching features."""

import numpy as np
import streamlit as st

from explorer import data, plots, session

db, sae = session.db(), session.sae()
info = data.sae_info(db, sae)
pts = data.map_points(db, sae)

st.title("Feature map")
n = len(pts["feature"])
if n == 0:
    st.info(f"**{sae}** has no feature statistics in this build.")
    st.stop()

method = (info.map_method or "umap").upper() if info else "UMAP"
controls = st.columns([2, 3])
mode = controls[0].segmented_control(
    "Colour by", ["expert", "density", "domain"], default="expert", key="map_colour",
    help="expert: which expert owns the feature · density: log10 firing rate · "
         "domain: corpus domain where it fires most",
) or "expert"
click = st.sidebar.radio(
    "Clicking a point", ["opens its feature page", "adds it to Steering"], key="map_click",
    help="Collect several features on the map, then steer with them together.",
)
query = controls[1].text_input(
    "Search top tokens and logit tokens", key="map_search", placeholder="e.g. def, Lord, love",
).strip()

matches = data.search_features(db, sae, query, limit=5000) if query else []
highlight = None
if query:
    rows = pts["row_of"]
    idx = [rows[m["feature"]] for m in matches if m["feature"] in rows]
    highlight = np.zeros(n, dtype=bool)
    highlight[idx] = True

if mode == "density":
    colour, cats = pts["log_density"], None
elif mode == "domain":
    colour, cats = pts["domain_code"], list(pts["domain_names"])
else:
    colour, cats = pts["expert"], None
fig = plots.feature_map(
    pts["x"], pts["y"], pts["feature"], colour, mode, hover=pts["hover"], highlight=highlight,
    categories=cats,
)
st.caption(
    f"{n:,} features of {sae}, placed by {method} of their decoder directions. "
    "Hover a point for its top tokens; click it to open the feature."
    + (f" **{len(matches):,}** match “{query}”." if query else "")
)

# A fresh chart key after each jump, so the old selection does not fire again on return.
nonce = st.session_state.setdefault("map_nonce", 0)
event = st.plotly_chart(
    fig, key=f"map-{nonce}", on_select="rerun", selection_mode="points",
    config={"scrollZoom": True, "displaylogo": False},
)
points = (event or {}).get("selection", {}).get("points", []) if event else []
picked = [p.get("customdata") for p in points if p.get("customdata") is not None]
if picked:
    f = picked[0][0] if isinstance(picked[0], list) else picked[0]
    st.session_state["map_nonce"] = nonce + 1
    if click == "adds it to Steering":
        session.add_to_steering(sae, int(f))
        chosen = [g for s, g in st.session_state[session.STEER_FEATURES] if s == sae]
        st.toast(f"Feature {int(f)} added to Steering ({len(chosen)} selected).")
        st.rerun()
    session.open_feature(sae, int(f))
if any(s == sae for s, _ in st.session_state.get(session.STEER_FEATURES, [])):
    chosen = [g for s, g in st.session_state[session.STEER_FEATURES] if s == sae]
    st.page_link(session.STEERING, label=f"Steer with the {len(chosen)} selected feature(s) →",
                 query_params={"sae": sae})

if query:
    st.subheader(f"Matches for “{query}”")
    if not matches:
        st.caption("No feature has this text among its top tokens or promoted logit tokens.")
    for m in matches[:30]:
        session.feature_link(
            sae, m["feature"],
            label=f"feature {m['feature']} · expert {m['expert']} · {m['matched']}: {m['top_tokens'] or '—'}",
        )
    if len(matches) > 30:
        st.caption(f"… and {len(matches) - 30:,} more highlighted on the map.")
