"""Compare: two SAEs of this build, feature by feature. Which features both learned, which only
one of them has, and — for MoE SAEs — which experts correspond; any pair side by side with
both features' examples. Matching is by decoder cosine (nearest feature both ways, and a
one-to-one matching), computed when the build was analysed."""

import numpy as np
import streamlit as st

from explorer import data, plots, render, session

db, sae = session.db(), session.sae()
st.title("Compare")
others = data.comparisons(db, sae)
if not others:
    st.info(f"Nothing to compare **{sae}** with: this build holds one SAE, or was analysed with "
            "`--no-compare`. Analyse two or more SAEs of one model and hook into one file "
            "(`moesae analyze RUN_A RUN_B --db FILE`, or a build with several [[sae]] tables).")
    st.stop()

saes = {s["sae"]: s for s in data.list_saes(db)}
# Default partner: what a reader of the paper compares (Scale ↔ Switch, TopK → Scale).
wanted = {"scale": "switch", "switch": "scale", "topk": "scale"}.get(saes[sae]["arch"])
default = next((o for o in others if saes[o]["arch"] == wanted), others[0])
if st.session_state.get("cmp_other") not in others:
    st.session_state["cmp_other"] = default
controls = st.columns([3, 2, 2])
other = controls[0].selectbox("Compare with", others, key="cmp_other")
tau = controls[1].slider(
    "Same feature at cosine ≥", 0.3, 0.99, 0.7, 0.01, key="cmp_tau",
    help="A feature counts as learned by both SAEs when its nearest feature in the other SAE has "
         "at least this decoder cosine, and as only in its own SAE otherwise.",
)
moe_a = (saes[sae].get("experts") or 1) > 1
expert = None
if moe_a:
    pick = controls[2].selectbox("Features of expert", ["all", *range(saes[sae]["experts"])],
                                 key="cmp_expert", help=f"Only features of this expert of {sae}.")
    expert = None if pick == "all" else int(pick)

A, B = sae, other
ma, mb = data.match_cos(db, A, B), data.match_cos(db, B, A)
near_a = np.asarray(ma["nearest_cos"], dtype=float)
near_b = np.asarray(mb["nearest_cos"], dtype=float)
st.caption(f"**{A}** ({saes[A]['arch']}, {saes[A]['width']:,} features) against **{B}** "
           f"({saes[B]['arch']}, {saes[B]['width']:,} features); features that never fired on "
           "the analysed tokens are left out.")

cols = st.columns(4)
cols[0].metric(f"{A}: in both", f"{(near_a >= tau).mean():.1%}" if near_a.size else "—",
               help=f"share of {A}'s firing features whose nearest {B} feature has cosine ≥ {tau:.2f}")
cols[1].metric(f"only in {A}", f"{(near_a < tau).sum():,}" if near_a.size else "—")
cols[2].metric(f"{B}: in both", f"{(near_b >= tau).mean():.1%}" if near_b.size else "—",
               help=f"share of {B}'s firing features whose nearest {A} feature has cosine ≥ {tau:.2f}")
cols[3].metric(f"only in {B}", f"{(near_b < tau).sum():,}" if near_b.size else "—")

left, right = st.columns(2)
with left:
    st.plotly_chart(plots.overlaid_histograms(
        {f"{A} → nearest in {B}": near_a, f"{B} → nearest in {A}": near_b},
        "Each feature's nearest in the other SAE", "decoder cosine", marker=tau),
        key=f"cmp-hist-{A}-{B}")
with right:
    moe_b = (saes[B].get("experts") or 1) > 1
    if moe_a or moe_b:
        share, mean_cos = data.expert_matches(db, A, B)
        if share.size:
            st.plotly_chart(plots.heatmap(
                share, list(range(share.shape[1])), list(range(share.shape[0])),
                f"Where each expert's features find their nearest ({A} → {B})",
                x_title=f"{B} expert", y_title=f"{A} expert", zmin=0, zmax=1, height=380),
                key=f"cmp-experts-{A}-{B}")
            best = share.argmax(1)
            st.caption("Best-matching expert per row: " + " · ".join(
                f"{i}→{int(j)} ({share[i, j]:.0%})" for i, j in enumerate(best[:16]))
                + (" …" if len(best) > 16 else ""))
    else:
        st.caption("Both SAEs are dense: no expert correspondence.")


def _side(name: str, f: int) -> None:
    """One feature of a pair: its name, expert, and three top examples."""
    session.feature_link(name, f, label=f"{name} · {data.feature_name(db, name, f)}")
    feat = data.feature(db, name, f)
    if feat is not None and (saes[name].get("experts") or 1) > 1:
        st.html(render.expert_legend([feat.expert]))
    ex = data.feature_examples(db, name, f, 3)
    if not ex:
        st.caption("no examples (it never fired on the analysed tokens)")
    for e in ex:
        lo, hi = max(0, e["position"] - 14), e["position"] + 6
        st.html(render.shade_tokens(e["tokens"][lo:hi], e["acts"][lo:hi], max(e["acts"]) or None,
                                    focus=e["position"] - lo))


def _table(x: str, y: str, order: str, keep, key: str, exp: int | None) -> None:
    rows = [r for r in data.feature_matches(db, x, y, order, 200, exp) if keep(r["nearest_cos"])]
    if not rows:
        st.caption("No feature here at this threshold.")
        return
    names_x, names_y = data.labels(db, x), data.labels(db, y)
    st.dataframe(
        [{"feature": r["feature"], "label": names_x.get(r["feature"], ""), "expert": r["expert"],
          "top tokens": r["top_tokens"], "density": r["density"], f"nearest in {y}": r["nearest"],
          "cos": r["nearest_cos"], "its label": names_y.get(r["nearest"], ""),
          "its top tokens": r["nearest_top_tokens"]} for r in rows],
        hide_index=True, height=260,
        column_config={"cos": st.column_config.NumberColumn(format="%.3f"),
                       "density": st.column_config.NumberColumn(format="%.2e")},
    )
    pick = st.selectbox("Side by side", range(len(rows)), key=f"cmp-pick-{key}",
                        format_func=lambda i: f"{x} {rows[i]['feature']} ↔ {y} {rows[i]['nearest']} "
                                              f"(cos {rows[i]['nearest_cos']:.3f})")
    r = rows[pick]
    lcol, rcol = st.columns(2)
    with lcol:
        _side(x, r["feature"])
    with rcol:
        _side(y, r["nearest"])
    if r["partner"] is not None and r["partner"] >= 0 and r["partner"] != r["nearest"]:
        st.caption(f"In the one-to-one matching {x} {r['feature']} is paired with {y} "
                   f"{r['partner']} (cos {r['partner_cos']:.3f}): its nearest was taken by a "
                   "closer match.")


tabs = st.tabs([f"Only in {A}", f"Only in {B}", "In both"])
with tabs[0]:
    st.caption(f"{A}'s features farthest from anything in {B}, least similar first: what {A} "
               f"learned and {B} did not.")
    _table(A, B, "unmatched", lambda c: c < tau, "a", expert)
with tabs[1]:
    st.caption(f"{B}'s features farthest from anything in {A}.")
    _table(B, A, "unmatched", lambda c: c < tau, "b", None)
with tabs[2]:
    st.caption(f"{A}'s features with the closest counterpart in {B}, most similar first.")
    _table(A, B, "shared", lambda c: c >= tau, "both", expert)
