"""Every page of the explorer through Streamlit's AppTest, on the small build of conftest.py."""

from __future__ import annotations

from urllib.parse import parse_qs

import duckdb
import numpy as np
import pytest

from .conftest import APP
from .synthetic import make_build

PAGES = {
    "overview": "Overview",
    "experts": "Experts",
    "feature_map": "Feature map",
    "redundancy": "Redundancy",
    "compare": "Compare",
    "feature": "Feature",
    "search_text": "Search text",
    "inspect_text": "Inspect text",
    "steering": "Steering",
}


def _open(at, page: str, **params):
    at.query_params.update({k: str(v) for k, v in params.items()})
    at.run()
    if page != "overview":
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _text(at) -> str:
    """Everything a reader sees as text on the page (markdown, captions, html, metrics, alerts)."""
    parts = [e.value for kind in ("markdown", "caption", "html", "info", "error", "warning",
                                  "header", "subheader", "title") for e in at.get(kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders(app, page):
    at = _open(app, page)
    assert [t.value for t in at.title] == [PAGES[page]]
    assert not at.error, [e.value for e in at.error]


def test_overview_compares_switch_and_scale(app):
    at = _open(app, "overview")
    reading = at.info[0].value
    assert "scale-e2 (Scale e=2)" in reading and "switch (Switch)" in reading
    assert "duplicate features" in reading
    assert len(at.dataframe) == 1
    assert at.get("plotly_chart"), "training curves are drawn"


def test_choose_an_expert(app):
    at = _open(app, "experts", sae="switch")
    at.selectbox(key="expert_pick").select(3).run()
    assert not at.exception
    assert at.query_params["expert"] == ["3"] or at.query_params["expert"] == "3"
    links = [link.value for link in at.get("page_link")]
    assert links and all(label.startswith("feature ") for label in links)
    # the sample text coloured by routed expert, tokens escaped
    coloured = [h.value for h in at.get("html") if "experts " in h.value]
    assert coloured and "<class>" not in "".join(coloured)
    at.toggle(key="only_expert").set_value(True).run()
    assert not at.exception


def test_deep_link_to_an_expert(app):
    at = _open(app, "experts", sae="scale-e2", expert=5)
    assert at.selectbox(key="expert_pick").value == 5


def test_threshold_slider_covers_the_stored_pairs_and_agrees_with_the_metric(app, build_db):
    from engine.store import open_db

    at = _open(app, "redundancy", sae="switch")
    assert [m.value for m in at.multiselect][0] == ["switch", "scale-e2"], "Switch and Scale side by side"
    assert "redundancy@0.90" in _text(at)
    slider = at.slider(key="red_threshold")
    with open_db(build_db) as s:
        lows, highs = zip(*(s.pair_cos_range(n) for n in ("switch", "scale-e2")), strict=True)
    assert slider.min == pytest.approx(np.ceil(max(lows) * 100) / 100)
    assert slider.max == pytest.approx(np.ceil(max(highs) * 100) / 100)
    for t in (slider.min, 0.9, slider.max):
        at.slider(key="red_threshold").set_value(t).run()
        assert not at.exception
        metrics = {m.label: m.value for m in at.metric}
        share = metrics[f"redundancy@{t:.2f}"]
        n_pairs = metrics[f"pairs > {t:.2f}"]
        # never a contradiction: some features above τ exactly when some pairs above τ
        assert (share == "0.00%") == (n_pairs == "0"), (t, share, n_pairs)
    assert "No all pair of switch's features exceeds cosine" in _text(at)
    at.radio(key="red_scope").set_value("within").run()
    assert not at.exception


def test_open_a_feature_from_a_neighbour_link(app):
    at = _open(app, "feature", sae="switch", feature=3)
    assert "switch · feature 3" in [h.value for h in at.header]
    nb = [link for link in at.get("page_link") if "cos" in link.value]
    assert nb, "neighbours are links"
    params = {k: v[0] for k, v in parse_qs(nb[0].proto.query_string).items()}
    assert params["sae"] == "switch"
    at.query_params.clear()
    at.query_params.update(params)
    at.switch_page("views/feature.py").run()
    assert not at.exception
    assert f"switch · feature {params['feature']}" in [h.value for h in at.header]


def test_feature_page_shows_examples_and_bands(app):
    at = _open(app, "feature", sae="scale-e2", feature=10)
    text = _text(at)
    assert "Top examples" in text and "Quantile bands" in text and "Nearest neighbours" in text
    assert any("background:" in h.value for h in at.get("html")), "tokens shaded by activation"
    at.number_input(key="feature_pick").set_value(11).run()
    assert "scale-e2 · feature 11" in [h.value for h in at.header]


def test_steer_button_takes_the_feature_to_the_steering_page(app):
    at = _open(app, "feature", sae="scale-e2", feature=7)
    at.button(key="steer-7").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Steering"]
    assert ("scale-e2", 7) in [tuple(p) for p in at.session_state["steer_features"]]
    assert any(s.label.startswith("feature 7") for s in at.select_slider)


def test_feature_out_of_range_is_explained(app):
    at = _open(app, "feature", sae="switch", feature=99999)
    assert any("does not exist" in w.value for w in at.warning)


def test_feature_map_search_highlights(app):
    at = _open(app, "feature_map", sae="switch")
    assert at.get("plotly_chart")
    at.text_input(key="map_search").input("Lord").run()
    assert not at.exception
    assert "Matches for “Lord”" in _text(at)
    assert any("Lord" in link.value for link in at.get("page_link"))
    at.button_group(key="map_colour").set_value("density").run()
    assert not at.exception


def test_inspect_text_runs_the_model_live(app):
    at = _open(app, "inspect_text", sae="scale-e2")
    at.text_area(key="inspect_text").input("In the beginning <b> was the Word").run(timeout=120)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    html = "".join(h.value for h in at.get("html"))
    assert "&lt;" in html and "experts " in html, "tokens escaped and coloured by expert"
    assert "Top features at token" in _text(at)
    links = [link.value for link in at.get("page_link")]
    assert links and all(" · feature " in v for v in links)
    assert any(len(v.split(" · ")) >= 3 for v in links), "features shown with their top tokens"


def test_inspect_without_checkpoint_says_so(app):
    at = _open(app, "inspect_text", sae="switch")
    assert any("checkpoint" in i.value for i in at.info)


# -- files that cannot be shown ----------------------------------------------------------------
def _message(monkeypatch, path) -> str:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOESAE_DB", str(path))
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1
    return at.error[0].value


def test_missing_file_message(monkeypatch, tmp_path):
    assert "No build file" in _message(monkeypatch, tmp_path / "nope.duckdb")


def test_not_a_build_message(monkeypatch, tmp_path):
    (tmp_path / "x.duckdb").write_text("hello")
    assert "cannot be opened" in _message(monkeypatch, tmp_path / "x.duckdb")
    con = duckdb.connect(str(tmp_path / "other.duckdb"))
    con.execute("CREATE TABLE t (a INTEGER)")
    con.close()
    assert "not a MoE-SAE Explorer build" in _message(monkeypatch, tmp_path / "other.duckdb")


def test_other_schema_version_message(monkeypatch, tmp_path):
    path = make_build(tmp_path / "old.duckdb", n_features=32, n_contexts=6)
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    assert "schema version 0" in _message(monkeypatch, path)


def test_empty_build_message(monkeypatch, tmp_path):
    path = make_build(tmp_path / "empty.duckdb", saes=(), n_contexts=3)
    assert "holds no analysed SAE" in _message(monkeypatch, path)


def test_the_reading_names_both_switch_baselines():
    from explorer.summary import metrics_rows, reading

    rows = metrics_rows([
        {"sae": "sw", "arch": "switch", "width": 64, "experts": 4, "active": 1, "k": 8,
         "metrics": {"mse": 4.0, "redundancy_ratio_0.9": 0.004}},
        {"sae": "stand", "arch": "scale", "width": 64, "experts": 4, "active": 1, "k": 8,
         "metrics": {"mse": 5.0, "redundancy_ratio_0.9": 0.012}},
        {"sae": "sc", "arch": "scale", "width": 64, "experts": 4, "active": 2, "k": 8,
         "metrics": {"mse": 3.0, "redundancy_ratio_0.9": 0.002}},
    ])
    assert [r["what it is"] for r in rows] == [
        "Switch SAE (the original: router-probability scaling)",
        "the authors' Switch stand-in (their Scale code with e = 1)",
        "Scale SAE, e = 2",
    ]
    text = reading(rows)
    assert "sc (Scale e=2) has 2.0× fewer duplicate features than sw (Switch)" in text
    assert "sc (Scale e=2) has 6.0× fewer duplicate features than stand (the authors' stand-in)" in text
    assert "The reconstruction MSE of sc is 25% lower than that of sw" in text
    assert "stand is the baseline the paper calls Switch" in text


def test_compare_page_lists_what_only_one_sae_learned(app):
    at = _open(app, "compare", sae="scale-e2")
    assert at.selectbox(key="cmp_other").value == "switch", "Scale is compared with Switch"
    text = _text(at)
    assert "scale-e2: in both" in text and "only in switch" in text
    assert len(at.get("plotly_chart")) == 2, "histogram and expert correspondence"
    assert len(at.tabs) == 3 and len(at.dataframe) == 3
    # a pair side by side: both features named, with examples
    pick = at.selectbox(key="cmp-pick-a")
    pick.select(pick.options[1] if len(pick.options) > 1 else pick.options[0]).run()
    assert not at.exception
    links = [link.value for link in at.get("page_link")]
    assert any(v.startswith("scale-e2 · feature") for v in links)
    assert any(v.startswith("switch · feature") for v in links)
    at.slider(key="cmp_tau").set_value(0.95).run()
    at.selectbox(key="cmp_expert").select(2).run()
    assert not at.exception


def test_compare_without_a_partner_says_so(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    path = make_build(tmp_path / "one.duckdb", saes=(("only", "scale"),), n_features=32, n_contexts=6)
    monkeypatch.setenv("MOESAE_DB", str(path))
    at = _open(AppTest.from_file(str(APP), default_timeout=30), "compare")
    assert any("Nothing to compare" in i.value for i in at.info)


def test_search_text_finds_contexts_and_their_features(app):
    at = _open(app, "search_text", sae="switch")
    at.text_input(key="search_text").input("Lord").run()
    assert not at.exception
    text = _text(at)
    assert "contain “Lord”" in text and "Features that fire there" in text
    assert at.dataframe and len(at.dataframe[0].value) > 0
    assert any("background:" in h.value and "Lord" in h.value for h in at.get("html"))
    at.text_input(key="search_text").input("zzzz-not-there").run()
    assert any("No analysed context contains" in i.value for i in at.info)


def test_a_label_saved_on_the_feature_page_shows_everywhere(app, build_db):
    from engine.store.notes import Notes, notes_path

    try:
        at = _open(app, "feature", sae="switch", feature=5)
        form_inputs = [t for t in at.text_input if t.label == "Label"]
        form_inputs[0].input("Bible names")
        [t for t in at.text_area if t.label == "Note"][0].input("mostly in Genesis")
        at.button[[b.label for b in at.button].index("Save")].click().run()
        assert not at.exception, [e.value for e in at.exception]
        r = Notes(build_db).get("switch", 5)
        assert (r["label"], r["note"]) == ("Bible names", "mostly in Genesis")
        assert "switch · feature 5 · “Bible names”" in [h.value for h in at.header]
        # the map's search finds it by its label
        at.switch_page("views/feature_map.py").run()
        at.text_input(key="map_search").input("bible names").run()
        assert any("“Bible names”" in link.value for link in at.get("page_link"))
        # without an explanation, the page says how to get one, and nothing was sent
        at.query_params.update({"sae": "switch", "feature": "6"})
        at.switch_page("views/feature.py").run()
        assert "moesae explain" in _text(at)
    finally:
        notes_path(build_db).unlink(missing_ok=True)


def test_sidebar_shows_the_whole_name(app):
    at = _open(app, "overview", sae="scale-e2")
    assert any(c.value.startswith("**scale-e2** · scale, 256 features, 8 experts, e = 2")
               for c in at.sidebar.caption)


def _lab(hex_colour: str) -> np.ndarray:
    c = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ c / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_palette_tells_64_experts_apart():
    from explorer.render import PALETTE, expert_color

    lab = np.array([_lab(c) for c in PALETTE])
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(len(lab)) * 1e9
    assert len(PALETTE) == 64 and dist.min() >= 14
    assert len({expert_color(e) for e in range(64)}) == 64
