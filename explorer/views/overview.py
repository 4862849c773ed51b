"""Overview: the SAEs of this build side by side, their training curves, and a reading."""

import streamlit as st

from engine.metrics import names
from explorer import data, plots, session, summary

db = session.db()
saes = data.list_saes(db)
infos = [data.sae_info(db, s["sae"]) for s in saes]
infos = [i for i in infos if i is not None]

st.title("Overview")
models = data.models(db)
if models:
    m = models[0]
    st.caption(
        f"Model **{m['name']}** at `{m['hook']}` · {len(infos)} SAE(s) · "
        f"{infos[0].n_tokens:,} analysed tokens in {infos[0].n_contexts:,} contexts"
        if infos else f"Model {m['name']}"
    )

rows = summary.metrics_rows([
    {"sae": i.name, "arch": i.arch, "width": i.width, "experts": i.experts, "active": i.active,
     "k": i.k, "metrics": i.metrics, "load_entropy": i.load_entropy}
    for i in infos
])
st.info(summary.reading(rows))

st.subheader("Metrics")
st.dataframe(
    rows,
    hide_index=True,
    column_config={
        "MSE": st.column_config.NumberColumn(
            format="%.4g", help="mean over held-out tokens of ‖x − x̂‖², in the model's units"),
        "FVU": st.column_config.NumberColumn(format="%.4f", help="fraction of variance unexplained"),
        "L0": st.column_config.NumberColumn(format="%.1f"),
        "dead": st.column_config.NumberColumn(
            format="percent", help="never fire on the held-out evaluation tokens (the training "
                                   "curve counts features silent over the last training tokens)"),
        "CE recovered": st.column_config.NumberColumn(format="%.3f"),
        "redundancy@0.9": st.column_config.NumberColumn(
            format="%.4f", help="fraction of features whose max decoder cosine to another is > 0.9"
        ),
        "load entropy": st.column_config.NumberColumn(
            format="%.3f", help="top-1 expert-load entropy / log N (1 = balanced)"
        ),
    },
)

st.subheader("Training curves")
logs = {i.name: i.training_log for i in infos if i.training_log}
if not logs:
    st.caption("No training logs in this build (imported SAEs have none).")
else:
    keys = {k for rows_ in logs.values() for r in rows_ for k, v in r.items() if isinstance(v, int | float)}
    preferred = [k for k in (names.FVU, names.MSE, names.L0, names.DEAD_FRACTION,
                             names.EXPERT_LOAD_ENTROPY, "lb_loss", "auxk_loss", "loss") if k in keys]
    others = sorted(keys - set(preferred) - {"step", "tokens"})
    shown = st.multiselect("Curves", preferred + others, default=preferred[:4])
    x_axis = "tokens" if "tokens" in keys else "step"
    dead_tokens = next((((i.config or {}).get("train_config") or {}).get("dead_tokens")
                        for i in infos if i.training_log), None)
    st.caption("Curves are over training batches; the Metrics table is on held-out tokens. MSE is "
               "in the model's units in both.")
    cols = st.columns(2)
    for n, metric_name in enumerate(shown):
        title = summary.curve_label(metric_name, next(iter(logs.values())), dead_tokens)
        with cols[n % 2]:
            st.plotly_chart(plots.training_curves(logs, metric_name, x=x_axis, title=title),
                            key=f"curve-{metric_name}")
