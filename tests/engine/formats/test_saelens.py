"""SAELens import/export against the installed sae-lens itself: identical reconstructions."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import ConfigError
from engine.formats import load_sae, save_sae
from engine.formats.saelens import export_saelens, import_saelens
from engine.sae import SAEConfig, build_sae
from engine.sae.imported import ImportedSAE
from engine.sae.topk import TopKSAE

sae_lens = pytest.importorskip("sae_lens")
SAE = sae_lens.SAE
JumpReLUSAE, JumpReLUSAEConfig = sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig
StandardSAE, StandardSAEConfig = sae_lens.StandardSAE, sae_lens.StandardSAEConfig
LensTopKSAE, TopKSAEConfig = sae_lens.TopKSAE, sae_lens.TopKSAEConfig

D_IN, D_SAE = 16, 64


def randomise(sae, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "W_dec" else 1.0))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.5)


def lens_sae(arch: str, apply_b_dec_to_input: bool, rescale: bool, seed: int):
    common = dict(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec_to_input)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        sae = LensTopKSAE(TopKSAEConfig(k=5, rescale_acts_by_decoder_norm=rescale, **common))
    sae.cfg.metadata.model_name = "gpt2"
    sae.cfg.metadata.hook_name = "blocks.8.hook_resid_pre"
    randomise(sae, seed)
    return sae


CASES = [
    ("standard", True, False),
    ("standard", False, False),
    ("jumprelu", True, False),
    ("jumprelu", False, False),
    ("topk", True, False),
    ("topk", False, False),
    ("topk", True, True),
]


@pytest.mark.parametrize("arch,apply_b_dec,rescale", CASES)
def test_import_reconstructs_like_saelens(tmp_path, arch, apply_b_dec, rescale):
    ref = lens_sae(arch, apply_b_dec, rescale, seed=len(arch) + 2 * apply_b_dec + rescale)
    ref.save_model(tmp_path / "lens")
    sae, meta = import_saelens(tmp_path / "lens")
    assert isinstance(sae, TopKSAE if arch == "topk" else ImportedSAE)
    assert meta["model"] == "gpt2" and meta["hook"] == "blocks.8.hook_resid_pre"
    assert meta["d_in"] == D_IN
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = ref(x)
        got = sae.reconstruct_raw(x)
        dense = sae.dense_codes(sae.encode(sae.normalise(x)))
        ref_acts = ref.encode(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    if not rescale:  # with rescaling our codes are SAELens' times the decoder norms
        assert torch.allclose(dense, ref_acts, atol=1e-5)
    # ... and it survives our own format.
    save_sae(sae, tmp_path / "ours", meta)
    again, meta2 = load_sae(tmp_path / "ours")
    assert meta2["source"]["architecture"] == arch
    with torch.no_grad():
        assert torch.equal(again.reconstruct_raw(x), got)


def test_load_sae_reads_a_saelens_folder_directly(tmp_path):
    lens_sae("jumprelu", True, False, 3).save_model(tmp_path / "lens")
    sae, meta = load_sae(tmp_path / "lens")
    assert isinstance(sae, ImportedSAE) and meta["source"]["format"] == "saelens"


def our_topk(seed: int = 0, scale: float = 0.05):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch="topk", d_in=D_IN, width=D_SAE, k=6))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.input_scale.fill_(scale)
    return sae


def test_export_topk_loads_in_saelens_with_identical_reconstructions(tmp_path):
    sae = our_topk()
    export_saelens(
        sae, tmp_path / "lens", {"model": "tiny-random", "hook": "blocks.1.hook_resid_post"}
    )
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert (
        cfg["architecture"] == "topk"
        and cfg["k"] == 6
        and cfg["metadata"]["model_name"] == "tiny-random"
    )
    lens = SAE.load_from_disk(tmp_path / "lens")
    x = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(2)) * 20  # raw units
    with torch.no_grad():
        expected = sae.reconstruct_raw(x)
        got = lens(x)
        ours = sae.dense_codes(sae.encode(sae.normalise(x)))
        theirs = lens.encode(x)
    # Outputs are ~100 in raw units here, where float32 spacing is ~1e-5: compare in the
    # SAE's normalised units (raw × 0.05), where the values are O(1).
    assert torch.allclose(got * 0.05, expected * 0.05, atol=1e-5, rtol=1e-5)
    # Exported feature activations are ours in raw units (divided by the input scale).
    assert torch.allclose(theirs * 0.05, ours, atol=1e-5, rtol=1e-5)
    # The decoder rows stay unit-norm.
    assert torch.allclose(lens.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    # Round trip back into our format.
    back, meta = import_saelens(tmp_path / "lens")
    assert meta["model"] == "tiny-random"
    with torch.no_grad():
        assert torch.allclose(back.reconstruct_raw(x) * 0.05, expected * 0.05, atol=1e-5, rtol=1e-5)


def test_export_imported_jumprelu_round_trips_through_saelens(tmp_path):
    ref = lens_sae("jumprelu", False, False, 7)
    ref.save_model(tmp_path / "a")
    sae, _ = import_saelens(tmp_path / "a")
    export_saelens(sae, tmp_path / "b")
    lens = SAE.load_from_disk(tmp_path / "b")
    x = torch.randn(100, D_IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(lens(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["switch", "scale"])
def test_export_of_moe_is_a_config_error(tmp_path, arch):
    sae = build_sae(SAEConfig(arch=arch, d_in=8, width=32, experts=4, active=2, k=4))
    with pytest.raises(ConfigError, match="Only dense TopK"):
        export_saelens(sae, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unsupported_normalisation_is_a_config_error(tmp_path):
    ref = lens_sae("standard", True, False, 0)
    ref.save_model(tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layer_norm"):
        import_saelens(tmp_path / "lens")
