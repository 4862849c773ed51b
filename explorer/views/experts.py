"""Experts: how tokens are routed (load, per domain, router confidence, ω), then one expert's
features, its most-routed tokens and a text coloured by routed expert."""

import numpy as np
import streamlit as st

from explorer import data, plots, render, session

db, sae = session.db(), session.sae()
info = data.sae_info(db, sae)
experts = data.experts(db, sae)

st.title("Experts")
if info is None or not experts or (info.experts or 1) <= 1:
    st.info(f"**{sae}** is a dense SAE ({info.arch if info else '?'}): it has no experts to route to. "
            "Choose a Switch or Scale SAE in the sidebar.")
    st.stop()

n = len(experts)
st.caption(f"{sae}: {n} experts, {info.active} active per token, {info.width:,} features "
           f"({info.width // n:,} per expert). Load entropy / log N = "
           + (f"{info.load_entropy:.3f}" if info.load_entropy is not None else "n/a"))

load1 = [e["load_top1"] or 0.0 for e in experts]
loadk = [e["load_topk"] or 0.0 for e in experts]
left, right = st.columns(2)
with left:
    st.plotly_chart(
        plots.expert_load(load1, loadk if (info.active or 1) > 1 else None,
                          title="Expert load (fraction of tokens)"),
        key="load",
    )
with right:
    dl = data.expert_domain_load(db, sae)
    doms = sorted({r["domain"] for r in dl})
    if dl and doms:
        z = np.zeros((len(doms), n))
        for r in dl:
            z[doms.index(r["domain"]), r["expert"]] = r["load_top1"] or 0.0
        st.plotly_chart(
            plots.heatmap(z, list(range(n)), doms, "Top-1 load per corpus domain",
                          x_title="expert", y_title="domain", height=340),
            key="domain-load",
        )
    else:
        st.caption("No per-domain routing was recorded.")

left, right = st.columns(2)
with left:
    conf = [e["mean_confidence"] for e in experts]
    if any(c is not None for c in conf):
        st.plotly_chart(
            plots.per_expert_bar([c or 0.0 for c in conf], "Router confidence",
                                 "mean router probability when chosen"),
            key="confidence",
        )
    rent = [e.get("router_entropy") for e in experts]
    if any(v is not None for v in rent):
        st.plotly_chart(
            plots.per_expert_bar([v or 0.0 for v in rent], "Router entropy",
                                 "mean H(p) / log N of the tokens it wins (0 = certain)"),
            key="router-entropy",
        )
    ent = [e["domain_entropy"] for e in experts]
    if any(v is not None for v in ent):
        st.plotly_chart(
            plots.per_expert_bar([v or 0.0 for v in ent], "Domain entropy of routed tokens",
                                 "entropy / log #domains (0 = one domain)"),
            key="domain-entropy",
        )
with right:
    omega = [e["omega"] for e in experts]
    if any(w is not None for w in omega):
        st.plotly_chart(
            plots.per_expert_bar([w or 0.0 for w in omega], "ω per expert (Feature Scaling)", "ω"),
            key="omega",
        )
    alive = [e["n_alive"] or 0 for e in experts]
    st.plotly_chart(plots.per_expert_bar(alive, "Live features per expert", "features that fire"),
                    key="alive")

# -- one expert ------------------------------------------------------------------------------------
st.divider()
asked = session.int_param("expert")
if "expert_pick" not in st.session_state or (asked is not None and 0 <= asked < n
                                             and asked != st.session_state["expert_pick"]):
    st.session_state["expert_pick"] = asked if asked is not None and 0 <= asked < n else int(np.argmax(load1))


def _remember_expert() -> None:
    st.query_params["expert"] = str(st.session_state["expert_pick"])


e = st.selectbox(
    "Expert", list(range(n)), key="expert_pick", on_change=_remember_expert,
    format_func=lambda i: f"expert {i}  ·  load {load1[i]:.1%}",
)
row = experts[e]
st.html(render.expert_legend([e]))
c1, c2, c3, c4 = st.columns(4)
c1.metric("Top-1 load", f"{load1[e]:.2%}")
c2.metric("Features alive", f"{row['n_alive'] or 0:,} / {row['n_features'] or 0:,}")
c3.metric("ω", f"{row['omega']:.3f}" if row["omega"] is not None else "—")
c4.metric("Router confidence", f"{row['mean_confidence']:.2f}" if row["mean_confidence"] is not None else "—")

left, right = st.columns([3, 2])
with left:
    st.markdown("**Top features** (most often firing)")
    feats = data.expert_top_features(db, sae, e, 12)
    if not feats:
        st.caption("None of this expert's features fired on the analysed tokens.")
    for f in feats:
        session.feature_link(
            sae, f["feature"],
            label=f"feature {f['feature']} · {f['density']:.3%} · {f['top_tokens'] or '—'}",
        )
with right:
    st.markdown("**Tokens routed here most**")
    toks = data.expert_top_tokens(db, sae, e, 20)
    if toks:
        st.dataframe(
            [{"token": repr(t["token"])[1:-1], "count": t["count"], "share": t["share"]} for t in toks],
            hide_index=True,
            column_config={"share": st.column_config.ProgressColumn(
                "share of its tokens", format="percent", min_value=0.0,
                max_value=max(t["share"] or 0 for t in toks) or 1.0)},
            height=320,
        )
    else:
        st.caption("No routed tokens recorded.")

st.markdown("**Text coloured by routed expert**")
domain_options = ["all domains", *data.domains(db)]
cols = st.columns([1, 2, 1])
dom = cols[0].selectbox("Domain", domain_options, key="sample_domain")
samples = data.sample_contexts(db, sae, n=20, domain=None if dom == "all domains" else dom)
if not samples:
    st.caption("No routed contexts recorded for this SAE.")
else:
    pick = cols[1].selectbox(
        "Context", list(range(len(samples))), key="sample_context",
        format_func=lambda i: f"#{samples[i]['context']} ({samples[i]['domain']}): {samples[i]['text'][:60]!r}",
    )
    only = cols[2].toggle(f"only expert {e}", value=False, key="only_expert")
    routing = data.context_routing(db, sae, samples[pick]["context"])
    tokens = [r["token"] for r in routing]
    if only:
        exps = [[e] if e in r["experts"] else [] for r in routing]
        weights = [r["weights"][r["experts"].index(e)] if e in r["experts"] else 0.0 for r in routing]
    else:
        exps = [r["experts"] for r in routing]
        weights = [r["weights"][0] if r["weights"] else 0.0 for r in routing]
    used = sorted({x[0] for x in exps if x})
    st.html(render.expert_legend(used))
    st.html(render.expert_tokens(tokens, exps, weights))
    st.caption("Colour: the first expert a token was routed to (strength = its router weight); "
               "hover a token for all its experts.")
