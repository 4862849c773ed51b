"""Search text: the analysed contexts that contain a string, and the features of the chosen SAE
that fire where it occurs (from the codes stored at analysis time, so no model is needed)."""

from collections import defaultdict

import streamlit as st

from explorer import data, render, session

db, sae = session.db(), session.sae()
info = data.sae_info(db, sae)

st.title("Search text")
query = st.text_input("Text to find in the analysed contexts", key="search_text",
                      placeholder="e.g. Lord, import, shall").strip("\n")
if not query.strip():
    n = info.n_contexts if info else 0
    st.caption(f"Searches the {n:,} contexts this build analysed (any case). For text of your own, "
               "use Inspect text, which runs the model.")
    st.stop()

limit = 50
hits = data.search_contexts(db, query, limit)
if not hits:
    st.info(f"No analysed context contains “{query}”.")
    st.stop()
st.caption(f"{len(hits)}{'+' if len(hits) >= limit else ''} contexts contain “{query}”; the features "
           f"below are {sae}'s strongest codes on the token each match ends in.")

# Features firing on the matched tokens, over all contexts found.
count: dict[int, int] = defaultdict(int)
peak: dict[int, float] = defaultdict(float)
per_hit = []
all_codes = data.contexts_codes(db, sae, tuple(h["context"] for h in hits))
for h in hits:
    codes = all_codes.get(h["context"], [])
    for pos in h["hits"]:
        here = codes[pos] if pos < len(codes) else []
        per_hit.append((h, pos, here))
        for f, a in here:
            count[f] += 1
            peak[f] = max(peak[f], a)
n_matches = len(per_hit)
ranked = sorted(count, key=lambda f: (-count[f], -peak[f]))[:30]

left, right = st.columns([2, 3])
with left:
    st.subheader("Features that fire there")
    if not ranked:
        st.caption("No feature of this SAE fires on the matched tokens.")
    tops, labels = data.top_tokens_of(db, sae), data.labels(db, sae)
    st.dataframe(
        [{"feature": f, "label": labels.get(f, ""), "matches": f"{count[f]}/{n_matches}",
          "max act": peak[f], "top tokens": tops.get(f, "")} for f in ranked],
        hide_index=True, height=360,
        column_config={"max act": st.column_config.NumberColumn(format="%.3g")},
    )
    if ranked:
        f = st.selectbox("Open", ranked, key="search_open",
                         format_func=lambda g: data.feature_name(db, sae, g))
        session.feature_link(sae, f, label=f"Open feature {f} →")
with right:
    st.subheader("Where it occurs")
    for h, pos, here in per_hit[:12]:
        toks = h["tokens"]
        lo, hi = max(0, pos - 16), pos + 8
        shade = [1.0 if i in h["hits"] else 0.0 for i in range(lo, min(hi, len(toks)))]
        st.caption(f"context {h['context']} · {h['domain']} · {h.get('split') or 'eval'} · token {pos}")
        st.html(render.shade_tokens(toks[lo:hi], shade, 1.0, focus=pos - lo, color="#59a14f"))
        if here:
            st.caption(" · ".join(f"{f} ({a:.2g})" + (f" “{labels[f]}”" if f in labels else "")
                                  for f, a in here[:6]))
    if len(per_hit) > 12:
        st.caption(f"… and {len(per_hit) - 12} more matches, counted in the table.")
