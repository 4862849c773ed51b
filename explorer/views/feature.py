"""Feature: one feature's statistics, expert, top examples shaded by activation, quantile
bands, activation histogram, logit effects and nearest neighbours. `?sae=…&feature=…`."""

import numpy as np
import streamlit as st

from engine.errors import DataError
from explorer import data, plots, render, session

db, sae = session.db(), session.sae()
info = data.sae_info(db, sae)
width = info.width if info else 0

st.title("Feature")
if width <= 0:
    st.info(f"**{sae}** has no features in this build.")
    st.stop()

asked = session.int_param("feature")
if asked is None:  # sidebar navigation drops query parameters: keep the last feature shown
    asked = st.session_state.get("_feature_shown")
if asked is None or not 0 <= asked < width:
    if asked is not None:
        st.warning(f"{sae} has features 0–{width - 1}; feature {asked} does not exist.")
    top = data.expert_top_features(db, sae, 0, 1)
    asked = int(top[0]["feature"]) if top else 0
if st.session_state.get("feature_pick") != asked:
    st.session_state["feature_pick"] = asked


def _go() -> None:
    st.query_params["feature"] = str(int(st.session_state["feature_pick"]))


f = int(st.sidebar.number_input("Feature id", 0, width - 1, key="feature_pick", step=1, on_change=_go))
st.session_state["_feature_shown"] = f
st.query_params["feature"] = str(f)  # also when equal: keeps the address bar in step

feat = data.feature(db, sae, f)
if feat is None:
    st.info(f"No statistics for feature {f} of {sae}.")
    st.stop()

notes = data.notes(db)
try:
    note = notes.get(sae, f)
except DataError as exc:
    note = None
    st.warning(str(exc))
label = (note or {}).get("label") or ""
st.header(f"{sae} · feature {f}" + (f" · “{label}”" if label else ""))
if note and note.get("explanation"):
    st.markdown(f"**Explanation** ({note.get('explained_by') or 'a language model'}): {note['explanation']}")
st.html(render.expert_legend([feat.expert]) if (info.experts or 1) > 1 else "")
if feat.top_tokens:
    st.markdown(f"Top tokens: {render.token_text(feat.top_tokens)}", unsafe_allow_html=True)

c = st.columns(6)
c[0].metric("Density", f"{feat.density:.3%}", help="fraction of analysed tokens where it fires")
c[1].metric("Fires on", f"{feat.n_fires:,}", help="analysed tokens where it is non-zero")
c[2].metric("Mean act", f"{feat.mean_act:.3g}", help="mean over the tokens where it fires")
c[3].metric("Max act", f"{feat.max_act:.3g}")
c[4].metric("Max cosine", f"{feat.max_cos:.3f}" if np.isfinite(feat.max_cos) else "—",
            help="to its nearest other feature's decoder direction")
c[5].metric("Domain", feat.preferred_domain or "—", help="corpus domain where it fires most")
links = st.columns([2, 1])
if (info.experts or 1) > 1:
    links[0].page_link(session.EXPERTS, label=f"Expert {feat.expert} — open on the Experts page",
                       query_params={"sae": sae, "expert": str(feat.expert)})
if links[1].button("Steer with this feature →", key=f"steer-{f}",
                   help="add it to the Steering page, with a strength slider"):
    session.steer_feature(sae, f)

left, right = st.columns([3, 2])
with left:
    st.subheader("Top examples")
    examples = data.feature_examples(db, sae, f, 12)
    if not examples:
        st.caption("This feature never fired on the analysed tokens.")
    for ex in examples:
        lo, hi = max(0, ex["position"] - 24), ex["position"] + 8
        st.caption(f"{ex['activation']:.3g} · {ex['domain']} · context {ex['context']}")
        st.html(render.shade_tokens(ex["tokens"][lo:hi], ex["acts"][lo:hi], feat.max_act,
                                    focus=ex["position"] - lo))
with right:
    if feat.hist_counts and len(feat.hist_edges) == len(feat.hist_counts) + 1:
        edges = np.log10(np.clip(np.asarray(feat.hist_edges, dtype=float), 1e-12, None))
        st.plotly_chart(plots.histogram(feat.hist_counts, edges, "Activation histogram",
                                        "log10 activation (where it fires)"), key="hist")
    if feat.logit_pos or feat.logit_neg:
        pos, neg = feat.logit_pos[:10], feat.logit_neg[:10]
        st.plotly_chart(plots.logit_effects([t for t, _ in pos], [v for _, v in pos],
                                            [t for t, _ in neg], [v for _, v in neg]), key="logits")
        if info.logit_note:
            st.caption(info.logit_note)
    if feat.domain_counts:
        st.markdown("**Where it fires** (firing tokens per domain)")
        st.dataframe([{"domain": d, "tokens": n} for d, n in
                      sorted(feat.domain_counts.items(), key=lambda kv: -kv[1])], hide_index=True)
    st.subheader("Nearest neighbours")
    if not feat.neighbours:
        st.caption("No neighbours recorded.")
    for nb in feat.neighbours:
        same = " (same expert)" if nb.get("expert") == feat.expert else f" (expert {nb.get('expert')})"
        session.feature_link(sae, nb["feature"],
                             label=f"cos {nb['cos']:.3f}{same} · {data.feature_name(db, sae, nb['feature'])}")

others = data.comparisons(db, sae)
if others:
    st.subheader("In the other SAEs")
    st.caption("The nearest feature by decoder cosine in each other SAE of this build, and its "
               "partner in a one-to-one matching (the Compare page has the whole picture).")
    for other in others:
        m = data.match_of(db, sae, other, f)
        if not m:
            continue
        cols = st.columns(2)
        with cols[0]:
            session.feature_link(other, m["nearest"], label=f"{other}: nearest · cos {m['nearest_cos']:.3f} · "
                                 f"{data.feature_name(db, other, m['nearest'])}")
        with cols[1]:
            if m["partner"] is not None and m["partner"] >= 0 and m["partner"] != m["nearest"]:
                session.feature_link(other, m["partner"], label=f"{other}: partner · cos "
                                     f"{m['partner_cos']:.3f} · {data.feature_name(db, other, m['partner'])}")

with st.expander("Label and notes" + (f": “{label}”" if label else ""), expanded=False):
    if note and note.get("stale"):
        st.warning("Written for an earlier build of this file; check it still fits this feature.")
    with st.form(key=f"notes-{sae}-{f}"):
        new_label = st.text_input("Label", value=label, max_chars=80,
                                  help="A short name, shown beside this feature on every page and "
                                       "in the map's hover; searchable on the Feature map.")
        new_note = st.text_area("Note", value=(note or {}).get("note") or "", height=90)
        if st.form_submit_button("Save"):
            try:
                notes.set(sae, f, label=new_label, note=new_note)
                st.toast("Saved.")
                st.rerun()
            except DataError as exc:
                st.error(str(exc))
    st.caption(f"Saved beside the build, in {notes.path.name}; a rebuild keeps them.")
    if not (note and note.get("explanation")):
        st.caption("No explanation yet. `moesae explain --db FILE --sae NAME --endpoint URL --llm "
                   "MODEL` writes one per feature with any OpenAI-compatible chat server (a local "
                   "vLLM or llama.cpp server works); nothing is sent anywhere unless you run it.")

st.subheader("Quantile bands")
bands = data.quantile_bands(db, sae, f)
if not bands:
    st.caption("No quantile bands recorded.")
for band in bands:
    title = (f"band {band['band']}: activation {band['lo']:.3g}–{band['hi']:.3g} · "
             f"{band['share']:.1%} of its activations")
    with st.expander(title, expanded=band is bands[0]):
        exs = band.get("examples") or []
        if not exs:
            st.caption("no sampled example in this band")
        for ex in exs[:4]:
            lo, hi = max(0, ex["position"] - 20), ex["position"] + 6
            st.html(render.shade_tokens(ex["tokens"][lo:hi], ex["acts"][lo:hi], feat.max_act,
                                        focus=ex["position"] - lo))
