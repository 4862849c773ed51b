"""The reference codes' checkpoints (the `dictionary_learning` layout: ae.pt + config.json) of
the Scale SAE authors and of the Switch SAE reference, imported into our classes: the same
reconstructions as a few-line reimplementation of their forward passes (written from their
public code, key names included), and a pickle holding anything but tensors refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.errors import DataError
from engine.formats import detect, import_sae, load_sae, save_sae

d, N, m, k = 16, 4, 8, 6
M = N * m


def scale_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {}
    for i in range(N):
        sd[f"expert_modules.{i}.encoder.weight"] = r(m, d) * 0.3
        sd[f"expert_modules.{i}.encoder.bias"] = r(m) * 0.1
        sd[f"expert_modules.{i}.decoder"] = r(m, d) * 0.3  # their rows are not unit-norm
    sd.update({"gate.weight": r(N, d), "gate.bias": r(N) * 0.1, "b_gate": r(d) * 0.1,
               "b_dec": r(d) * 0.1, "omega": r(N) * 0.5, "beta": torch.zeros(N),
               "lp_transform_decoder.weight": torch.eye(d),
               "lp_transform_encoder.weight": torch.eye(d) + 0.2 * r(d, d)})
    return sd


def their_scale_forward(sd, x, e, heaviside):
    """MultiExpertScaleAutoEncoder.forward, dense over every expert as in their code."""
    p = torch.softmax((x - sd["b_gate"]) @ sd["gate.weight"].T + sd["gate.bias"], -1)
    top_v, top_i = p.topk(e, -1)
    if heaviside:
        mask = torch.zeros_like(p).scatter(-1, top_i, 1.0)
    else:
        mask = torch.softmax(torch.full_like(p, float("-inf")).scatter(-1, top_i, top_v), -1)
    outs = []
    for i in range(N):
        W = sd[f"expert_modules.{i}.encoder.weight"]
        A = W.mean(0, keepdim=True) @ sd["lp_transform_encoder.weight"].T  # lp_transform_encoder(avg)
        M_hat = A + (sd["omega"][i] + 1) * (W - A)
        outs.append(F.relu(F.linear(x - sd["b_dec"], M_hat, sd[f"expert_modules.{i}.encoder.bias"])))
    f = (torch.stack(outs, 1) * mask[:, :, None]).reshape(len(x), M)
    v, idx = f.topk(k, sorted=False)
    dec = torch.cat([sd[f"expert_modules.{i}.decoder"] for i in range(N)])
    return (v[:, :, None] * dec[idx]).sum(1) + sd["b_dec"]


def switch_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"encoder.weight": r(M, d) * 0.3, "router.weight": r(N, d), "decoder": r(M, d) * 0.3,
            "b_dec": r(d) * 0.1, "b_router": r(d) * 0.1}


def their_switch_forward(sd, x, heaviside):
    """SwitchAutoEncoder.forward: z over all M, masked to the top-1 expert scaled by p_{i*}."""
    z = F.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T)
    p = torch.softmax((x - sd["b_router"]) @ sd["router.weight"].T, -1)
    top_v, top_i = p.topk(1, -1)
    filt = torch.zeros_like(p).scatter(-1, top_i, top_v)
    if heaviside:
        filt = (filt > 0).float()
    f = z * filt.repeat_interleave(m, dim=1)
    v, idx = f.topk(k, sorted=False)
    return (v[:, :, None] * sd["decoder"][idx]).sum(1) + sd["b_dec"]


def write(folder, sd, trainer):
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder


@pytest.mark.parametrize("e,heaviside", [(1, False), (2, False), (2, True), (4, False)])
def test_the_scale_authors_checkpoint_gives_their_reconstructions(tmp_path, e, heaviside):
    sd = scale_state()
    folder = write(tmp_path / "scale", sd, {
        "trainer_class": "MoETrainer", "dict_class": "MoEAutoEncoder", "activation_dim": d,
        "dict_size": M, "k": k, "experts": N, "e": e, "heaviside": heaviside, "layer": 8,
        "lm_name": "/home/someone/gpt2", "submodule_name": "resid_post_layer_8"})
    assert detect(folder).name == "dictionary_learning"
    sae, meta, fmt = import_sae(folder)
    assert (sae.cfg.arch, sae.cfg.active, fmt) == ("scale", e, "dictionary_learning")
    assert meta["model"] == "gpt2" and meta["hook"] == "blocks.8.hook_resid_post"
    x = torch.randn(64, d) * 2
    with torch.no_grad():
        assert torch.allclose(sae.reconstruct_raw(x), their_scale_forward(sd, x, e, heaviside), atol=1e-5)
    save_sae(sae, tmp_path / "ours", meta)  # and it survives our own format
    again, _ = load_sae(tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(again.reconstruct_raw(x), sae.reconstruct_raw(x), atol=1e-6)


@pytest.mark.parametrize("heaviside", [False, True])
def test_the_switch_references_checkpoint_gives_its_reconstructions(tmp_path, heaviside):
    sd = switch_state()
    folder = write(tmp_path / "switch", sd, {
        "trainer_class": "SwitchTrainer", "dict_class": "SwitchAutoEncoder", "activation_dim": d,
        "dict_size": M, "k": k, "experts": N, "heaviside": heaviside, "lb_alpha": 0.01,
        "lm_name": "openai-community/gpt2", "layer": 8})
    sae, meta, _ = import_sae(folder)
    assert sae.cfg.arch == "switch" and meta["model"] == "openai-community/gpt2"
    x = torch.randn(64, d) * 2
    with torch.no_grad():
        assert torch.allclose(sae.reconstruct_raw(x), their_switch_forward(sd, x, heaviside), atol=1e-5)


class NotATensor:
    pass


def test_a_pickle_with_anything_but_tensors_is_refused(tmp_path):
    sd = switch_state()
    sd["extra"] = NotATensor()
    folder = write(tmp_path / "evil", sd, {"trainer_class": "SwitchTrainer", "activation_dim": d,
                                           "dict_size": M, "k": k, "experts": N})
    with pytest.raises(DataError, match="holds objects other than tensors, so it is not loaded"):
        import_sae(folder)


def test_moesae_import_of_a_reference_checkpoint(tmp_path):
    write(tmp_path / "scale", scale_state(), {
        "trainer_class": "MoETrainer", "activation_dim": d, "dict_size": M, "k": k, "experts": N,
        "e": 2, "heaviside": False})
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "import", str(tmp_path / "scale"),
                           "--out", str(tmp_path / "ours")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "dictionary_learning" in proc.stdout
    assert load_sae(tmp_path / "ours")[0].cfg.arch == "scale"
