"""The model and SAE run live for the Inspect-text page. torch and the model code are imported
here only, lazily, so the other pages never load them."""

from __future__ import annotations

import streamlit as st


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def model(name: str):
    """The build's LoadedModel, once per server, shared by Inspect text and Steering."""
    from engine.models import load_model

    return load_model(name)


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=4)
def sae(checkpoint: str, device: str = "cpu"):
    """An SAE checkpoint folder, once per server."""
    from engine.formats import load_sae

    return load_sae(checkpoint, device=device)[0]


def model_and_sae(model_name: str, checkpoint: str):
    """(LoadedModel, SAE) for a build's model and one SAE's checkpoint folder. Raises engine
    UserErrors (one sentence) when either cannot be loaded."""
    lm = model(model_name)
    return lm, sae(checkpoint, str(lm.device))


@st.cache_data(show_spinner="Running the model…", max_entries=64)
def inspect(model_name: str, checkpoint: str, hook: str, text: str, top_n: int = 8) -> list[dict]:
    """Per token: its text, the SAE's strongest features [(feature, activation)] and the
    experts it was routed to (with router weights). At most 512 tokens."""
    import torch

    lm, sae_ = model_and_sae(model_name, checkpoint)
    tokens = lm.to_tokens(text)[:, :512]
    with lm.lock, torch.no_grad():  # never while a steering hook is registered
        acts = lm.activations(tokens, hook)[0].float()
        codes = sae_.encode(sae_.normalise(acts))
    top_acts = codes.top_acts.cpu().numpy()
    top_idx = codes.top_indices.cpu().numpy()
    exp = None if codes.expert_indices is None else codes.expert_indices.cpu().numpy()
    wts = None if codes.expert_weights is None else codes.expert_weights.cpu().numpy()
    strs = lm.token_strs(tokens[0])
    out = []
    for t, tok in enumerate(strs):
        order = top_acts[t].argsort()[::-1]
        feats = [(int(top_idx[t, j]), float(top_acts[t, j])) for j in order if top_acts[t, j] > 0]
        out.append({
            "position": t,
            "token": tok,
            "features": feats[:top_n],
            "experts": [] if exp is None else [int(e) for e in exp[t]],
            "weights": [] if wts is None else [float(w) for w in wts[t]],
        })
    return out
