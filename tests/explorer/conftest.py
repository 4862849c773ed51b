"""A small real build for the explorer tests, made once per session.

The build is written by `engine.store.BuildWriter` from synthetic statistics (synthetic.py),
plus one real tiny Scale SAE checkpoint (on the tiny random model's width) so Inspect text
runs the model and an SAE live.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .synthetic import make_build

APP = Path(__file__).resolve().parents[2] / "explorer" / "app.py"


def _tiny_checkpoint(folder: Path) -> Path:
    from engine.formats import save_sae
    from engine.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(arch="scale", d_in=64, width=256, experts=8, active=2, k=16))
    return save_sae(sae, folder, {"model": "tiny-random", "hook": "blocks.1.hook_resid_post"})


@pytest.fixture(scope="session")
def build_db(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explorer")
    ckpt = _tiny_checkpoint(root / "scale-ckpt")
    return make_build(root / "small.duckdb", checkpoints={"scale-e2": str(ckpt)})


@pytest.fixture()
def app(build_db, monkeypatch):
    """An AppTest of the explorer on the small build (default 30 s per run)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOESAE_DB", str(build_db))
    return AppTest.from_file(str(APP), default_timeout=30)
