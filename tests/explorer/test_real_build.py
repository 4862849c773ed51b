"""Every page on a build made by the real pipeline (engine.build on the tiny random model:
harvest → train Switch and Scale for 30 steps → eval → analyze). About 80 s on 2 CPU cores, so
marked slow; the default suite uses the synthetic build of conftest.py."""

from __future__ import annotations

import pytest

from .conftest import APP
from .test_app import PAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_db(tmp_path_factory):
    from engine.build import BuildConfig, build
    from engine.options import set_flat

    root = tmp_path_factory.mktemp("real-build")
    cfg = set_flat(BuildConfig(), dict(
        db=str(root / "real.duckdb"), model="tiny-random", corpus="pydoc,fortunes,bible",
        tokens=6000, context_len=32, width=256, experts=8, k=8, steps=30, batch_tokens=256,
        eval_tokens=1024, analysis_contexts=40,
    ))
    cfg.saes = [{"name": "switch", "arch": "switch"}, {"name": "scale-e2", "arch": "scale", "active": 2}]
    return build(cfg, progress=False, log=lambda *a: None)


@pytest.mark.parametrize("page", list(PAGES))
@pytest.mark.parametrize("sae", ["switch", "scale-e2"])
def test_every_page_on_a_real_build(real_db, monkeypatch, page, sae):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOESAE_DB", str(real_db))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["sae"] = sae
    at.run()
    if page != "overview":
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert [t.value for t in at.title] == [PAGES[page]]
    if page == "inspect_text":
        assert any("Top features at token" in m.value for m in at.markdown)
