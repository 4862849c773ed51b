"""The Steering page, headless (AppTest) and in Chromium: sliders per selected feature,
Generate → default vs steered, presets; on the tiny random model with a random Scale SAE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.formats import save_sae
from engine.models import TINY_MODEL, load_model
from engine.sae import SAEConfig, build_sae
from engine.store import BuildWriter
from explorer import data

from .browser import free_port, needs_chromium, wait_healthy
from .browser import launch as chromium

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "explorer" / "views" / "steering.py")
M = 64


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A build with one Scale SAE (checkpoint saved, features with max_act and top tokens)."""
    tmp = tmp_path_factory.mktemp("steer_page")
    lm = load_model(TINY_MODEL)
    hook = lm.default_hook
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="scale", d_in=lm.d_model, width=M, experts=4, active=2, k=8))
    acts = lm.activations(lm.to_tokens("The meaning of life is a question for the ages."), hook)[0, 1:]
    with torch.no_grad():
        sae.input_scale.fill_(float((lm.d_model / acts.pow(2).sum(-1).mean()).sqrt()))
    folder = save_sae(sae, tmp / "ckpt", {"model": TINY_MODEL, "hook": hook})
    db = tmp / "b.duckdb"
    with BuildWriter(db) as w:
        w.insert("saes", {
            "sae": ["moe"], "model": [TINY_MODEL], "hook": [hook], "arch": ["scale"],
            "width": np.array([M]), "experts": np.array([4]), "active": np.array([2]),
            "k": np.array([8]), "config": [json.dumps({**sae.cfg.to_dict(), "checkpoint": str(folder)})],
            "hist_edges": np.array([[0.1, 1.0, 10.0]]),
        })
        w.insert("features", {
            "sae": ["moe"] * M, "feature": np.arange(M), "expert": np.arange(M) // 16,
            "n_fires": np.full(M, 10), "density": np.full(M, 0.1), "max_act": np.full(M, 40.0),
            "top_tokens": [f"tok{f}" for f in range(M)],
        })
    return db


def page(build, features=(("moe", 11),), query=None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(PAGE, default_timeout=180)
    at.session_state["moesae_db"] = data.db_key(str(build))
    at.session_state["moesae_sae"] = "moe"
    at.session_state["steer_features"] = [tuple(p) for p in features]
    for k, v in (query or {}).items():
        at.query_params[k] = v
    return at.run()


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in at.success] + [e.value for e in at.error] + [e.value for e in at.info]
    return "\n".join(str(p) for p in parts)


def test_sliders_for_selected_features_and_query_param(build):
    at = page(build, features=[("moe", 11), ("moe", 3), ("other", 1)], query={"steer": "5"})
    assert not at.exception
    sliders = at.select_slider
    assert len(sliders) == 3
    labels = [s.label for s in sliders]
    assert any(lbl.startswith("feature 11 · expert 0 · max 40") for lbl in labels)
    assert any(lbl.startswith("feature 5") for lbl in labels)
    opts = [float(o) for o in sliders[0].options]
    assert opts == sorted(opts) and min(opts) == -max(opts) == -200.0 and 0.0 in opts
    assert abs(opts[len(opts) // 2 + 1]) < 1.0  # fine near zero
    assert "other SAEs are hidden" in texts(at)
    assert "steer" not in at.query_params  # consumed: removing feature 5 later sticks
    at.button(key="steer_remove:moe:5").click().run()
    assert len(at.select_slider) == 2


def test_generate_shows_default_and_steered_and_zero_is_identical(build):
    at = page(build)
    at.select_slider(key="steer_strength:moe:11:add").set_value(200.0)
    at.button(key="steer_generate").click().run()
    assert not at.exception, at.exception
    shown = texts(at)
    assert "**Default**" in shown and "**Steered**" in shown
    assert "first differ at new token" in shown
    assert "What fires on the continuations" in [h.value for h in at.subheader]
    assert len(at.dataframe) == 2

    at.select_slider(key="steer_strength:moe:11:add").set_value(0.0)
    at.button(key="steer_generate").click().run()
    assert not at.exception
    assert "identical to the default" in texts(at)


def test_empty_prompt_is_one_clear_error(build):
    at = page(build)
    at.text_area(key="steer_prompt").input("   ")
    at.button(key="steer_generate").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The prompt is empty; write some text for the model to continue."
    ]


def test_presets_save_and_reload(build):
    at = page(build)
    at.select_slider(key="steer_strength:moe:11:add").set_value(18.0)
    at.radio(key="steer_positions").set_value("generated")
    at.text_input(key="steer_preset_name").input("happy")
    at.run()
    at.button(key="steer_preset_save").click().run()
    presets = at.session_state["steer_presets"]
    assert presets["happy"]["features"] == [[11, 18.0]]
    assert presets["happy"]["positions"] == "generated" and presets["happy"]["sae"] == "moe"

    at.radio(key="steer_positions").set_value("all")
    at.select_slider(key="steer_strength:moe:11:add").set_value(0.0)
    at.run()
    at.selectbox(key="steer_preset_pick").set_value("happy")
    at.button(key="steer_preset_load").click().run()
    assert not at.exception
    assert at.radio(key="steer_positions").value == "generated"
    assert at.select_slider(key="steer_strength:moe:11:add").value == 18.0


# -- in a real browser --------------------------------------------------------------------------
@pytest.mark.browser
@needs_chromium
def test_page_in_chromium(build, tmp_path):
    """Serve the page under its own st.navigation (independent of app.py's page list), move a
    slider, Generate, and read both continuations from the rendered page."""
    from playwright.sync_api import sync_playwright

    app = tmp_path / "steer_app.py"
    app.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import streamlit as st\n"
        "from explorer import data, session\n"
        f"session.set_db(data.db_key({str(build)!r}))\n"
        "st.session_state.setdefault('moesae_sae', 'moe')\n"
        "st.session_state.setdefault('steer_features', [('moe', 11)])\n"
        f"st.navigation([st.Page({PAGE!r}, title='Steering')]).run()\n"
    )
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        with sync_playwright() as pw:
            browser = chromium(pw)
            pg = browser.new_page()
            pg.goto(base, timeout=60_000)
            pg.get_by_text("feature 11 · expert 0").wait_for(timeout=120_000)
            slider = pg.locator('[data-testid="stSlider"]', has_text="feature 11")
            slider.get_by_role("slider").focus()
            for _ in range(20):  # to the top stop, +5 × max_act
                pg.keyboard.press("ArrowRight")
            pg.wait_for_timeout(500)
            assert slider.get_by_role("slider").get_attribute("aria-valuetext") == "+200"
            pg.get_by_role("button", name="Generate").click()
            # "Steered" heads both the steered text and its firing features once results are in
            pg.get_by_text("Steered", exact=True).first.wait_for(timeout=180_000)
            assert pg.locator('[data-testid="stException"]').count() == 0
            body = pg.inner_text("body")
            assert "Default" in body and "What fires on the continuations" in body
            assert "first differ at new token" in body
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
