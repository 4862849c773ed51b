"""Steering: the selected features with a strength slider each, a prompt and sampling settings;
Generate shows the default and the steered continuation side by side (changed tokens marked),
then which features and experts fire on each. Presets save and reload a whole setup.

Features arrive from other pages through `st.session_state["steer_features"]` (a list of
(sae, feature) pairs) or the query parameter `?steer=3,17` (features of the chosen SAE).
Generation runs the model live (engine.steering); results are cached in the sidecar file beside
the build (`<db>.steer.duckdb`), never in the build itself, which stays read-only.
"""

from __future__ import annotations

import json

import streamlit as st

from engine.errors import UserError
from engine.steering.cache import cached_steer, result_key
from engine.steering.run import SteerResult, steer, token_diff
from engine.steering.spec import SteerSpec, strength_options
from engine.steering.target import target_from_info
from explorer import data, live, render, session

FEATURES_KEY = session.STEER_FEATURES
PRESETS_KEY = "steer_presets"
RESULT_KEY = "steer_result"
DEFAULT_PROMPT = "The meaning of life is"


# -- live resources (one per process, shared by sessions; the model's lock serialises its use) --
@st.cache_resource(show_spinner=False, max_entries=4)
def _cache(db_path: str):
    from engine.store import SteeringCache

    return SteeringCache(db_path)


def _strength_key(sae: str, f: int, mode: str) -> str:
    return f"steer_strength:{sae}:{f}:{mode}"


def _neutral(mode: str) -> float:
    return 1.0 if mode == "scale" else 0.0


# Widget values live in session state (set before the widgets exist) so a preset can set them.
WIDGET_DEFAULTS = {
    "steer_mode": "add", "steer_positions": "all", "steer_expert_action": "none", "steer_expert": 0,
    "steer_max_new": 24, "steer_temperature": 0.0, "steer_top_p": 1.0, "steer_seed": 0,
    "steer_prompt": DEFAULT_PROMPT,
}


def apply_preset(preset: dict, n_experts: int) -> None:
    """Button callback (runs before the next script run, when widget state may still change)."""
    p_sae = preset.get("sae") or st.session_state.get("moesae_sae")
    spec = SteerSpec.from_dict(preset)
    for f, s in spec.features:
        session.add_to_steering(p_sae, f)
        st.session_state[_strength_key(p_sae, f, spec.mode)] = float(s)
    st.session_state.update({
        "steer_mode": spec.mode, "steer_positions": spec.positions,
        "steer_max_new": spec.max_new_tokens, "steer_temperature": spec.temperature,
        "steer_top_p": spec.top_p, "steer_seed": spec.seed,
        "steer_prompt": preset.get("prompt") or DEFAULT_PROMPT,
    })
    expert = spec.ablate_expert if spec.ablate_expert is not None else spec.force_expert
    st.session_state["steer_expert_action"] = (
        "ablate" if spec.ablate_expert is not None else "force" if expert is not None else "none"
    )
    if expert is not None and expert < n_experts:
        st.session_state["steer_expert"] = int(expert)
    if p_sae and p_sae != st.session_state.get("moesae_sae"):
        st.query_params["sae"] = p_sae


def _diff_html(tokens: list[str], marks: list[bool], color: str) -> str:
    parts = []
    for tok, changed in zip(tokens, marks, strict=True):
        style = f"background:{color}55; border-bottom:2px solid {color};" if changed else ""
        parts.append(f'<span style="{style}">{render.token_text(tok)}</span>')
    box = ("font-family: ui-monospace, Menlo, monospace; font-size: 0.9em; line-height: 1.9;"
           " white-space: pre-wrap; word-break: break-word;")
    return f'<div style="{box}">{"".join(parts) or "<i>(nothing generated)</i>"}</div>'


# -- page -------------------------------------------------------------------------------------------
db, sae = session.db(), session.sae()
info = data.sae_info(db, sae)
st.title("Steering")
if info is None or not info.width:
    st.info(f"**{sae}** has no features in this build.")
    st.stop()
width, n_experts = int(info.width), int(info.experts or 1)
for k, v in WIDGET_DEFAULTS.items():
    st.session_state.setdefault(k, v)

if "steer" in st.query_params:  # consumed once, so removing a feature later sticks
    for raw in str(st.query_params["steer"]).split(","):
        if raw.strip().isdigit() and int(raw) < width:
            session.add_to_steering(sae, int(raw))
    del st.query_params["steer"]

chosen = [int(f) for s, f in st.session_state.get(FEATURES_KEY, []) if s == sae]
others = [p for p in st.session_state.get(FEATURES_KEY, []) if p[0] != sae]
if others:
    st.caption(f"{len(others)} selected feature(s) of other SAEs are hidden; pick that SAE to see them.")

# Sidebar: how to steer and how to sample.
st.sidebar.subheader("Steering")
mode = st.sidebar.radio(
    "Mode", ["add", "clamp", "scale"], key="steer_mode", horizontal=True,
    help="add: strength × the feature's decoder direction at the hook. clamp: set the "
    "feature's value (the SAE's error term is kept). scale: multiply its value.",
)
positions = st.sidebar.radio(
    "Positions", ["all", "generated"], key="steer_positions", horizontal=True,
    help="generated: only the last prompt token and the new tokens are steered.",
)
ablate = force = None
if n_experts > 1:
    expert_action = st.sidebar.radio(
        "Expert intervention", ["none", "ablate", "force"], key="steer_expert_action",
        horizontal=True,
        help="ablate: remove one expert's features from the code; force: route every token to "
        "one expert. The SAE's error term is kept in both.",
    )
    if expert_action != "none":
        e = int(st.sidebar.number_input("Expert", 0, n_experts - 1, key="steer_expert"))
        ablate, force = (e, None) if expert_action == "ablate" else (None, e)
st.sidebar.subheader("Sampling")
max_new = int(st.sidebar.slider("Max new tokens", 1, 128, key="steer_max_new"))
temperature = float(st.sidebar.slider("Temperature", 0.0, 2.0, step=0.05, key="steer_temperature",
                                      help="0 = greedy"))
top_p = float(st.sidebar.slider("Top-p", 0.05, 1.0, step=0.05, key="steer_top_p"))
seed = int(st.sidebar.number_input("Seed", 0, 2**31 - 1, key="steer_seed",
                                   help="The default and the steered run share it."))

# Features: add by number, one slider each.
c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
new_f = c1.number_input(f"Add a feature (0–{width - 1})", 0, width - 1, 0, key="steer_add_id")
if c2.button("Add", key="steer_add"):
    session.add_to_steering(sae, int(new_f))
    st.rerun()

strengths: list[tuple[int, float]] = []
if not chosen:
    st.info("No features selected yet: add one above, or use **steer** on a feature page or "
            "a selection on the feature map.")
for f in chosen:
    feat = data.feature(db, sae, f)
    max_act = feat.max_act if feat else None
    opts = strength_options(max_act, mode)
    key = _strength_key(sae, f, mode)
    current = float(st.session_state.setdefault(key, _neutral(mode)))
    if current not in opts:  # a preset's value between stops: keep it exactly
        opts = sorted({*opts, current})
    label = data.feature_name(db, sae, f, with_tokens=False)
    if feat is not None:
        label += f" · expert {feat.expert} · max {feat.max_act:.3g} · {feat.top_tokens[:60]}"
    cols = st.columns([8, 1], vertical_alignment="bottom")
    value = cols[0].select_slider(label, options=opts, key=key, format_func=lambda v: f"{v:+.3g}")
    if cols[1].button("✕", key=f"steer_remove:{sae}:{f}", help="remove this feature"):
        st.session_state[FEATURES_KEY] = [
            p for p in st.session_state.get(FEATURES_KEY, []) if (p[0], int(p[1])) != (sae, f)
        ]
        st.rerun()
    strengths.append((f, float(value)))

prompt = st.text_area("Prompt", key="steer_prompt", height=100)
spec = SteerSpec(
    features=strengths, mode=mode, positions=positions, ablate_expert=ablate, force_expert=force,
    max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=seed,
)

if st.button("Generate", type="primary", key="steer_generate"):
    try:
        spec.validate(width, n_experts)
        target = target_from_info(info)
        sae_obj = live.sae(target.checkpoint, str(live.model(target.model).device))
        key = result_key(target.model, sae, sae_obj, prompt, spec)
        with st.spinner("Generating the default and the steered continuation…"):
            result = cached_steer(
                _cache(db[0]), key,
                lambda: steer(live.model(target.model), sae_obj, target.hook, prompt, spec),
            )
        st.session_state[RESULT_KEY] = (sae, result.to_dict(), result.cached)
    except UserError as exc:
        st.session_state.pop(RESULT_KEY, None)
        st.error(str(exc))

# Results: side by side, then what fires.
shown = st.session_state.get(RESULT_KEY)
if shown and shown[0] == sae:
    res = SteerResult.from_dict(shown[1], cached=shown[2])
    mark_d, mark_s = token_diff(res.default_tokens, res.steered_tokens)
    if res.first_diff is None:
        st.success("The steered continuation is identical to the default one.")
    else:
        st.caption(f"The continuations first differ at new token {res.first_diff}; changed tokens "
                   f"are marked.{' (from the cache)' if res.cached else ''}")
    left, right = st.columns(2)
    left.markdown("**Default**")
    left.html(_diff_html(res.default_token_strs, mark_d, "#4e79a7"))
    right.markdown("**Steered**")
    right.html(_diff_html(res.steered_token_strs, mark_s, "#e15759"))

    st.subheader("What fires on the continuations")
    st.caption("SAE codes at the hook over the generated tokens; for the steered run, of the "
               "activations after the intervention.")
    left, right = st.columns(2)
    for col, fires, title in ((left, res.default_fires, "Default"), (right, res.steered_fires, "Steered")):
        if not fires:
            continue
        col.markdown(f"**{title}**")
        if fires.get("top_expert"):
            col.html(render.expert_tokens(fires["tokens"], fires["top_expert"]))
            col.html(render.expert_legend(fires["top_expert"]))
        tops, names_ = data.top_tokens_of(db, sae), data.labels(db, sae)
        col.dataframe([{**r, "label": names_.get(r["feature"], ""), "top tokens": tops.get(r["feature"], "")}
                       for r in fires["features"]], hide_index=True, width="stretch",
                      column_config={"max_act": st.column_config.NumberColumn(format="%.3g")})
        if fires.get("experts"):
            col.bar_chart({"top-1 share": [e["share_top1"] for e in fires["experts"]]},
                          x_label="expert", height=180)

# Presets: save, reload, download, upload.
with st.expander("Presets"):
    presets: dict = st.session_state.setdefault(PRESETS_KEY, {})
    name = st.text_input("Preset name", key="steer_preset_name")
    if st.button("Save preset", key="steer_preset_save", disabled=not name.strip()):
        presets[name.strip()] = {"sae": sae, "prompt": prompt, **spec.to_dict()}
        st.toast(f"Saved preset '{name.strip()}'.")
    if presets:
        pick = st.selectbox("Load a preset", sorted(presets), key="steer_preset_pick")
        st.button("Load", key="steer_preset_load", on_click=apply_preset,
                  args=(presets[pick], n_experts))
        st.download_button("Download presets (JSON)", json.dumps(presets, indent=2),
                           file_name="steering-presets.json", mime="application/json",
                           key="steer_preset_download")
    up = st.file_uploader("Upload presets (JSON)", type=["json"], key="steer_preset_upload")
    if up is not None:
        try:
            incoming = json.loads(up.getvalue())
            if not isinstance(incoming, dict) or not all(isinstance(v, dict) for v in incoming.values()):
                raise ValueError("expected an object of name → preset")
            for v in incoming.values():
                SteerSpec.from_dict(v)  # each must describe a spec
            presets.update(incoming)
            st.caption(f"{len(incoming)} preset(s) available from {up.name}.")
        except (ValueError, TypeError) as exc:
            st.error(f"{up.name} is not a presets file ({exc}).")
