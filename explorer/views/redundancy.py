"""Redundancy: did two experts learn the same thing? Expert × expert similarity, the
distribution of each feature's max cosine, and the duplicate pairs above a threshold, each
pair side by side with both features' top examples. Two SAEs (Switch and Scale) side by side."""

import numpy as np
import streamlit as st

from explorer import data, plots, render, session

db, sae = session.db(), session.sae()
saes = data.list_saes(db)
names = [s["sae"] for s in saes]
arch = {s["sae"]: s["arch"] for s in saes}

st.title("Redundancy")

# Default comparison: the first Switch and the first Scale SAE when the build has both.
default = [sae]
switch = next((s for s in names if arch[s] == "switch"), None)
scale = next((s for s in names if arch[s] == "scale"), None)
if switch and scale and sae in (switch, scale):
    default = [switch, scale]
controls = st.columns([3, 2, 2])
shown = controls[0].multiselect(
    "SAEs", names, default=default, max_selections=2, key="red_saes",
    help="Pick two to compare them side by side.",
) or [sae]
# The slider covers exactly the stored pairs: every pair above the lowest stored cosine is
# stored (at least the 500 most similar of each SAE, and all down to 0.7), so any threshold
# on the slider lists every pair above it and agrees with redundancy@τ beside it.
ranges = [r for r in (data.pair_cos_range(db, n) for n in shown) if r is not None]
lo = float(np.ceil(max(r[0] for r in ranges) * 100) / 100) if ranges else 0.5
hi = float(np.ceil(max(r[1] for r in ranges) * 100) / 100) if ranges else 1.0
lo, hi = min(lo, 0.99), min(max(hi, lo + 0.01), 1.0)
default_t = 0.9 if lo <= 0.9 < hi else round(max(lo, hi - 0.05), 2)  # some pairs always show
if not lo <= st.session_state.get("red_threshold", default_t) <= hi:
    st.session_state["red_threshold"] = default_t
threshold = controls[1].slider(
    "Duplicate threshold (decoder cosine)", lo, hi, default_t, 0.01, key="red_threshold",
    help=f"From the lowest to the highest cosine of the stored pairs ({lo:.2f}–{hi:.2f}); a pair "
         "counts when its cosine is above the threshold.",
)
scope = controls[2].radio(
    "Pairs", ["all", "within", "across"], horizontal=True, key="red_scope",
    help="within: both features in the same expert · across: in different experts",
)

cols = st.columns(len(shown))
for col, name in zip(cols, shown, strict=True):
    with col:
        st.subheader(f"{name} · {arch[name]}")
        mc = data.max_cos_distribution(db, name)
        max_cos = np.asarray(mc["max_cos"], dtype=float)
        finite = max_cos[np.isfinite(max_cos)]
        share = float((finite > threshold).mean()) if finite.size else float("nan")
        pairs = data.duplicate_pairs(db, name, threshold, 500, scope)
        a, b, c = st.columns(3)
        a.metric(f"redundancy@{threshold:.2f}", f"{share:.2%}" if finite.size else "—",
                 help="fraction of features whose max decoder cosine to any other exceeds the threshold")
        b.metric("mean max cos", f"{finite.mean():.3f}" if finite.size else "—")
        c.metric(f"pairs > {threshold:.2f}", f"{len(pairs)}{'+' if len(pairs) >= 500 else ''}",
                 help=f"{scope} pairs of features whose decoder cosine exceeds the threshold")
        sim = data.expert_similarity(db, name)
        if sim.size and sim.shape[0] > 1:
            st.plotly_chart(
                plots.heatmap(sim, list(range(sim.shape[0])), list(range(sim.shape[0])),
                              "Expert × expert similarity", x_title="expert j", y_title="expert i",
                              zmin=0, zmax=1, height=380),
                key=f"sim-{name}",
            )
        else:
            st.caption("Dense SAE: no expert × expert similarity.")
        counts, edges = plots.bin_values(finite, bins=50, lo=0.0, hi=1.0)
        st.plotly_chart(
            plots.histogram(counts, edges, "Each feature's max cosine to any other", "max cosine",
                            log_y=True, marker=threshold),
            key=f"maxcos-{name}",
        )


def _examples(name: str, f: int) -> None:
    session.feature_link(name, f, label=data.feature_name(db, name, f))
    ex = data.feature_examples(db, name, f, 3)
    if not ex:
        st.caption("no examples (the feature never fired on the analysed tokens)")
    for e in ex:
        lo, hi = max(0, e["position"] - 12), e["position"] + 6
        st.html(render.shade_tokens(e["tokens"][lo:hi], e["acts"][lo:hi],
                                    max(e["acts"]) or None, focus=e["position"] - lo))


st.divider()
st.subheader(f"Duplicate pairs (cosine > {threshold:.2f}, {scope})")
per_page = 8
tabs = st.tabs(shown) if len(shown) > 1 else [st.container()]
for tab, name in zip(tabs, shown, strict=True):
    with tab:
        pairs = data.duplicate_pairs(db, name, threshold, 500, scope)
        labels = data.labels(db, name)
        if not pairs:
            st.caption(f"No {scope} pair of {name}'s features exceeds cosine {threshold:.2f}.")
            continue
        st.dataframe(
            [{"a": p["a"], "b": p["b"], "cos": p["cos"],
              "label a": labels.get(p["a"], ""), "label b": labels.get(p["b"], ""), "expert a": p["expert_a"],
              "expert b": p["expert_b"], "same expert": p["within"],
              "top tokens a": p["top_tokens_a"], "top tokens b": p["top_tokens_b"]} for p in pairs],
            hide_index=True, height=240,
            column_config={"cos": st.column_config.NumberColumn(format="%.3f")},
        )
        pages_n = (len(pairs) + per_page - 1) // per_page
        page = 1
        if pages_n > 1:
            page = st.number_input("Page of pairs", 1, pages_n, 1, key=f"pairs-page-{name}")
        for p in pairs[(page - 1) * per_page: page * per_page]:
            where = "same expert" if p["within"] else f"experts {p['expert_a']} ↔ {p['expert_b']}"
            st.markdown(f"**{p['a']} ↔ {p['b']}** · cos {p['cos']:.3f} · {where}")
            left, right = st.columns(2)
            with left:
                st.html(render.expert_legend([p["expert_a"]]))
                _examples(name, p["a"])
            with right:
                st.html(render.expert_legend([p["expert_b"]]))
                _examples(name, p["b"])
