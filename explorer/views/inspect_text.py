"""Inspect text: type text, run the model and the SAE live, and see each token's strongest
features and the experts it was routed to; a feature link opens its page."""

import streamlit as st

from engine.errors import UserError
from explorer import data, live, render, session

db, sae = session.db(), session.sae()
info = data.sae_info(db, sae)

st.title("Inspect text")
checkpoint = (info.config or {}).get("checkpoint") if info else None
if info is None or not checkpoint:
    st.info(f"This build does not record where **{sae}**'s checkpoint is, so it cannot be run "
            "live. Rebuild with `moesae build` to record it.")
    st.stop()

text = st.text_area(
    "Text", key="inspect_text", height=110,
    value="The Lord is my shepherd; I shall not want.\ndef add(a, b):\n    return a + b",
)
if not text.strip():
    st.caption("Type some text to see its features.")
    st.stop()

try:
    tokens = live.inspect(info.model, checkpoint, info.hook, text)
except UserError as exc:
    st.error(f"The model or the SAE could not be loaded: {exc}")
    st.stop()
except (OSError, RuntimeError, ValueError) as exc:
    st.error(f"Running {info.model} with {sae} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    st.stop()

moe = any(t["experts"] for t in tokens)
if moe:
    st.markdown("**Tokens coloured by routed expert** (hover for all experts)")
    st.html(render.expert_legend(sorted({t["experts"][0] for t in tokens if t["experts"]})))
    st.html(render.expert_tokens([t["token"] for t in tokens], [t["experts"] for t in tokens],
                                 [t["weights"][0] if t["weights"] else 0.5 for t in tokens]))
else:
    strength = [t["features"][0][1] if t["features"] else 0.0 for t in tokens]
    st.markdown("**Tokens shaded by their strongest feature's activation**")
    st.html(render.shade_tokens([t["token"] for t in tokens], strength))

pos = st.selectbox(
    "Token", list(range(len(tokens))), key="inspect_token",
    index=min(1, len(tokens) - 1),
    format_func=lambda i: f"{i}: {tokens[i]['token']!r}",
)
tok = tokens[pos]
left, right = st.columns([3, 2])
with left:
    st.markdown(f"**Top features at token {pos}** {render.token_text(repr(tok['token']))}",
                unsafe_allow_html=True)
    if not tok["features"]:
        st.caption("No feature fires here.")
    for f, act in tok["features"]:
        session.feature_link(sae, f, label=f"{act:.3g} · {data.feature_name(db, sae, f)}")
with right:
    if tok["experts"]:
        st.markdown("**Routed to**")
        st.html(render.expert_legend(tok["experts"]))
        st.caption(" · ".join(f"expert {e}: {w:.2f}" for e, w in zip(tok["experts"], tok["weights"], strict=False)))

with st.expander("All tokens"):
    st.dataframe(
        [{"pos": t["position"], "token": repr(t["token"])[1:-1],
          "experts": ", ".join(map(str, t["experts"])),
          "top features": " | ".join(f"{a:.2g} {data.feature_name(db, sae, f)}" for f, a in t["features"][:3])}
         for t in tokens],
        hide_index=True,
    )
