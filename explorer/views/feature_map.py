"""Feature map: every feature of the SAE on its UMAP (or PCA) map. Hover shows top tokens,
clicking a point opens its feature page, the search box highlights matching features."""

import html

import numpy as np
import streamlit as st

from engine.errors import DataError
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
# Default: the corpus domain each feature fires most on: on the demo's maps it is what the
# layout separates (Bible, Python docs, …); the experts' features interleave all over it.
n_domains = len(set(pts["domain_names"]) - {"none"})
mode = controls[0].segmented_control(
    "Colour by", ["domain", "expert", "density"],
    default="domain" if n_domains > 1 else "density", key="map_colour",
    help="domain: corpus domain where it fires most · expert: which expert owns the feature "
         "(the hover names it too) · density: log10 firing rate",
) or "domain"
click = st.sidebar.radio(
    "Clicking a point", ["opens its feature page", "adds it to Steering"], key="map_click",
    help="Collect several features on the map, then steer with them together.",
)
query = controls[1].text_input(
    "Search top tokens, logit tokens and labels", key="map_search", placeholder="e.g. def, Lord, love",
).strip()

matches = data.search_features(db, sae, query, limit=5000) if query else []
labels = data.labels(db, sae)
if query:  # labels, notes and explanations match too
    try:
        noted = data.notes(db).search(sae, query, limit=5000)
    except DataError:
        noted = []
    have = {m["feature"] for m in matches}
    matches = [{"feature": int(r["feature"]), "expert": int(pts["expert"][pts["row_of"][int(r["feature"])]]),
                "matched": "notes", "top_tokens": labels.get(int(r["feature"]), "")}
               for r in noted if int(r["feature"]) not in have and int(r["feature"]) in pts["row_of"]] + matches
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
hover = pts["hover"]
if labels:  # a labelled feature's hover starts with its label
    hover = hover.copy()
    for f, text in labels.items():
        if f in pts["row_of"]:
            hover[pts["row_of"][f]] = f"<b>{html.escape(text, quote=False)}</b><br>" + hover[pts["row_of"][f]]
fig = plots.feature_map(
    pts["x"], pts["y"], pts["feature"], colour, mode, hover=hover, highlight=highlight,
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
        st.caption("No feature has this text among its top tokens, promoted logit tokens or notes.")
    for m in matches[:30]:
        session.feature_link(
            sae, m["feature"],
            label=f"{data.feature_name(db, sae, m['feature'])} · expert {m['expert']} · matched in {m['matched']}",
        )
    if len(matches) > 30:
        st.caption(f"… and {len(matches) - 30:,} more highlighted on the map.")
