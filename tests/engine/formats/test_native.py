"""Our checkpoint format: symmetric save/load, atomic replacement, one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.formats as formats
from engine.errors import DataError
from engine.formats import load_sae, save_sae
from engine.sae import SAEConfig, build_sae
from engine.sae.imported import ImportedSAE

CONFIGS = {
    "topk": SAEConfig(arch="topk", d_in=8, width=32, k=4),
    "switch": SAEConfig(arch="switch", d_in=8, width=32, experts=4, k=4),
    "scale": SAEConfig(arch="scale", d_in=8, width=32, experts=4, active=2, k=4),
    "scale-noscaling": SAEConfig(
        arch="scale", d_in=8, width=32, experts=4, active=2, k=4, feature_scaling=False
    ),
}
META = {
    "model": "tiny-random",
    "hook": "blocks.1.hook_resid_post",
    "acts": "/x",
    "train_config": {"lr": 1e-3},
}


def random_sae(cfg: SAEConfig, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(**cfg.to_dict()))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.input_scale.fill_(0.37)
    return sae


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(tmp_path, name):
    sae = random_sae(CONFIGS[name])
    save_sae(sae, tmp_path / "ck", META)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "ck" / "cfg.json").read_text())
    assert cfg["format"] == "moesae-sae/1" and cfg["arch"] == sae.cfg.arch
    assert cfg["input_scale"] == pytest.approx(0.37) and cfg["d_in"] == 8
    loaded, meta = load_sae(tmp_path / "ck")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert meta["model"] == "tiny-random" and meta["hook"] == META["hook"]
    assert meta["train_config"] == {"lr": 1e-3}
    x = torch.randn(10, 8)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct_raw(x), sae.reconstruct_raw(x))


def test_imported_sae_round_trips(tmp_path):
    sae = ImportedSAE(SAEConfig(arch="jumprelu", d_in=6, width=20))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        sae.threshold.abs_()
    save_sae(sae, tmp_path / "ck", {"model": "m"})
    loaded, _ = load_sae(tmp_path / "ck")
    assert isinstance(loaded, ImportedSAE) and loaded.cfg.arch == "jumprelu"
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct_raw(x), sae.reconstruct_raw(x))


def test_save_replaces_existing_checkpoint_and_leaves_no_temporaries(tmp_path):
    save_sae(random_sae(CONFIGS["topk"], 0), tmp_path / "ck")
    second = random_sae(CONFIGS["scale"], 1)
    save_sae(second, tmp_path / "ck")
    loaded, _ = load_sae(tmp_path / "ck")
    assert loaded.cfg.arch == "scale"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    save_sae(random_sae(CONFIGS["topk"]), tmp_path / "ck")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(formats.native, "save_file", boom)
    with pytest.raises(OSError):
        save_sae(random_sae(CONFIGS["scale"]), tmp_path / "ck")
    monkeypatch.undo()
    loaded, _ = load_sae(tmp_path / "ck")
    assert loaded.cfg.arch == "topk"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_refuses_to_replace_an_unrelated_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an SAE checkpoint folder"):
        save_sae(random_sae(CONFIGS["topk"]), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def _saved(tmp_path: Path) -> Path:
    save_sae(random_sae(CONFIGS["topk"]), tmp_path / "ck")
    return tmp_path / "ck"


def _one_sentence(exc: pytest.ExceptionInfo, name: str) -> None:
    msg = str(exc.value)
    assert name in msg and "\n" not in msg and msg.endswith(".")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_sae(tmp_path / "nope")
    _one_sentence(e, "nope")


@pytest.mark.parametrize("name", ["cfg.json", "sae.safetensors"])
def test_missing_file(tmp_path, name):
    folder = _saved(tmp_path)
    (folder / name).unlink()
    with pytest.raises(DataError) as e:
        load_sae(folder)
    _one_sentence(e, name)


def test_bad_json(tmp_path):
    folder = _saved(tmp_path)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON") as e:
        load_sae(folder)
    _one_sentence(e, "cfg.json")


def test_invalid_config(tmp_path):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["k"] = 10_000
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="invalid SAE") as e:
        load_sae(folder)
    _one_sentence(e, "cfg.json")


def test_corrupt_safetensors(tmp_path):
    folder = _saved(tmp_path)
    (folder / "sae.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match="not a readable safetensors") as e:
        load_sae(folder)
    _one_sentence(e, "sae.safetensors")


def test_missing_tensor_and_wrong_shape(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "sae.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(path))
    with pytest.raises(DataError, match="no tensor 'b_enc'") as e:
        load_sae(folder)
    _one_sentence(e, "sae.safetensors")
    tensors["W_dec"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(DataError, match="'W_dec' has shape") as e:
        load_sae(folder)
    _one_sentence(e, "sae.safetensors")


def test_nan_weights_rejected(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "sae.safetensors"
    tensors = load_file(str(path))
    tensors["b_dec"][0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(DataError, match="NaN"):
        load_sae(folder)


def test_never_pickles():
    """No loader unpickles arbitrary objects: no pickle.load, and the one torch.load (the
    reference code's ae.pt) runs with weights_only=True, which refuses anything but tensors."""
    import re

    calls = 0
    for src in Path(formats.__file__).parent.glob("*.py"):
        text = src.read_text()
        assert "pickle.load" not in text, src
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            calls += 1
            assert "weights_only=True" in call, (src, call)
    assert calls >= 1  # the dictionary_learning importer


def test_a_checkpoint_from_before_the_scaling_form_was_recorded_gives_its_old_outputs(tmp_path):
    """Checkpoints saved before 2026-11-25 computed Feature Scaling with the plain mean; their
    cfg.json has no scaling_form, and they load with that form and the outputs they gave."""
    sae = random_sae(CONFIGS["scale"])
    sae.cfg.scaling_form = "plain_mean"
    with torch.no_grad():
        sae.T.add_(0.2 * torch.randn_like(sae.T))
        sae.omega.normal_(0, 0.5)
    x = torch.randn(16, 8)
    want = sae(x).x_hat
    save_sae(sae, tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    del cfg["scaling_form"]  # what an old checkpoint looks like
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    loaded, _ = load_sae(tmp_path / "old")
    assert loaded.cfg.scaling_form == "plain_mean"
    assert torch.allclose(loaded(x).x_hat, want, atol=1e-6)
    fresh = build_sae(CONFIGS["scale"])
    assert fresh.cfg.scaling_form == "t_mean"  # new SAEs follow METHOD §3
