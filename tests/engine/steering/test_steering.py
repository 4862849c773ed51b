"""Steering on the tiny random model with a random Scale SAE: exactness, hygiene (hooks
removed), the effect of each intervention, the cache, the CLI and its error sentences."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from engine.cli import steer as steer_cli
from engine.errors import ConfigError, UserError
from engine.formats import save_sae
from engine.models import TINY_MODEL, load_model
from engine.sae import SAEConfig, build_sae
from engine.steering.cache import cached_steer, spec_key
from engine.steering.intervention import Intervention, forced_codes
from engine.steering.run import SteerResult, steer, token_diff
from engine.steering.spec import SteerSpec
from engine.store import BuildWriter, SteeringCache, open_db

PROMPT = "The quick brown fox jumps over the lazy dog. Then"


@pytest.fixture(scope="module")
def lm():
    return load_model(TINY_MODEL)


@pytest.fixture(scope="module")
def hook(lm):
    return lm.default_hook  # the last block of the 2-layer model: logits = W_U·norm(x)


def fitted_sae(lm, hook, arch="scale", **kw):
    """A random SAE whose input scale and biases are set from the model's activations, as
    training would (METHOD §3), so its codes and routing are not degenerate."""
    torch.manual_seed(0)
    cfg = dict(arch=arch, d_in=lm.d_model, width=64, experts=4, active=2, k=8)
    cfg.update(kw)
    sae = build_sae(SAEConfig(**cfg))
    acts = lm.activations(lm.to_tokens(PROMPT + " and a second sentence about trees."), hook)[0, 1:]
    scale = (lm.d_model / acts.pow(2).sum(-1).mean()).sqrt()
    with torch.no_grad():
        sae.input_scale.fill_(float(scale))
        centre = (acts * scale).mean(0)
        for name in ("b_dec", "b_gate", "b_router"):
            if hasattr(sae, name):
                getattr(sae, name).copy_(centre)
    return sae.eval()


@pytest.fixture(scope="module")
def sae(lm, hook):
    return fitted_sae(lm, hook)


def prompt_acts(lm, hook):
    tokens = lm.to_tokens(PROMPT)
    return tokens, lm.activations(tokens, hook)


def no_hooks_left(lm) -> bool:
    return all(len(hp._forward_hooks) == 0 for hp in lm.model.hook_dict.values())


# -- exactness and hygiene -----------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["all", "generated"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_strength_zero_reproduces_the_default_exactly(lm, sae, hook, positions, temperature):
    spec = SteerSpec(features=[(5, 0.0), (17, 0.0)], positions=positions, max_new_tokens=6,
                     temperature=temperature, top_p=0.9, seed=3)
    r = steer(lm, sae, hook, PROMPT, spec, analyse=False)
    assert r.steered_tokens == r.default_tokens
    assert r.steered_text == r.default_text
    assert r.first_diff is None
    assert len(r.default_tokens) == 6


def test_strength_zero_leaves_activations_bit_identical(lm, sae, hook):
    tokens, acts = prompt_acts(lm, hook)
    fn = Intervention(sae, SteerSpec(features=[(5, 0.0)]), tokens.shape[1])
    assert torch.equal(fn(acts), acts)


def test_model_outputs_identical_after_a_call_and_after_an_exception(lm, sae, hook, monkeypatch):
    tokens = lm.to_tokens(PROMPT)
    before = lm.logits(tokens)
    steer(lm, sae, hook, PROMPT, SteerSpec(features=[(5, 40.0)], max_new_tokens=3))
    assert torch.equal(lm.logits(tokens), before)
    assert no_hooks_left(lm)

    calls = {"n": 0}

    def explode(self, act, offset=0):
        calls["n"] += 1
        if calls["n"] == 2:  # fail mid-generation, after the hook has run once
            raise RuntimeError("boom inside the hook")
        return act

    monkeypatch.setattr(Intervention, "apply", explode)
    with pytest.raises(RuntimeError, match="boom"):
        steer(lm, sae, hook, PROMPT, SteerSpec(features=[(5, 40.0)], max_new_tokens=4))
    monkeypatch.undo()
    assert no_hooks_left(lm)
    assert torch.equal(lm.logits(tokens), before)
    # and the model still steers normally afterwards (the per-model lock was released)
    r = steer(lm, sae, hook, PROMPT, SteerSpec(features=[(5, 0.0)], max_new_tokens=2), analyse=False)
    assert r.first_diff is None


# -- what each intervention does -----------------------------------------------------------------
def top_logit_tokens(lm, sae, f, n=5):
    """The tokens a feature's decoder direction promotes most (its logit effect)."""
    effect = lm.final_norm(sae.W_dec[f].detach()[None]) @ lm.unembed_matrix()
    return effect[0].topk(n).indices


def test_strong_positive_strength_raises_the_feature_top_logit_tokens(lm, sae, hook):
    tokens, acts = prompt_acts(lm, hook)
    f = 11
    top = top_logit_tokens(lm, sae, f)
    base = lm.logits(tokens)[0, -1]
    strength = 20 * float(sae.normalise(acts[0]).norm(dim=-1).max())
    fn = Intervention(sae, SteerSpec(features=[(f, strength)]), tokens.shape[1])
    steered = lm.logits_with_hook(tokens, hook, fn)[0, -1]
    rise = steered - base
    assert float(rise[top].min()) > float(rise.quantile(0.99))  # logits of this model are small
    assert int(steered.argmax()) in top.tolist()
    # the same through generation: the first steered token is one of the feature's top tokens
    r = steer(lm, sae, hook, PROMPT, SteerSpec(features=[(f, strength)], max_new_tokens=3))
    assert r.steered_tokens[0] in top.tolist()
    assert r.first_diff == 0
    assert r.steered_fires["tokens"] == r.steered_token_strs


def test_negative_strength_lowers_them(lm, sae, hook):
    tokens, acts = prompt_acts(lm, hook)
    f = 11
    top = top_logit_tokens(lm, sae, f)
    base = lm.logits(tokens)[0, -1]
    fn = Intervention(sae, SteerSpec(features=[(f, -30.0)]), tokens.shape[1])
    rise = lm.logits_with_hook(tokens, hook, fn)[0, -1] - base
    assert float(rise[top].max()) < float(rise.quantile(0.01))


def test_clamp_and_scale_change_only_that_feature_and_keep_the_error_term(lm, sae, hook):
    _, acts = prompt_acts(lm, hook)
    x = acts[0]
    for mode, val in (("clamp", 7.5), ("scale", 3.0), ("scale", 0.0)):
        f = 20
        z, z_new, delta = Intervention(sae, SteerSpec(features=[(f, val)], mode=mode), 1).code_edit(x)
        changed = (z_new != z).any(0).nonzero().flatten().tolist()
        assert changed in ([f], [])
        want = torch.full_like(z[:, f], val) if mode == "clamp" else z[:, f] * val
        assert torch.allclose(z_new[:, f], want)
        # x' = denorm(decode(z')) + (x − denorm(decode(z))): the error term is kept
        dec = lambda c: sae.denormalise(c @ sae.W_dec + sae.b_dec)  # noqa: E731
        x_new = dec(z_new) + (x - dec(z))
        assert torch.allclose(x + delta, x_new, atol=1e-5)
    # clamping a feature that is active somewhere really changes the code
    active = int(z.sum(0).argmax())
    z, z_new, _ = Intervention(sae, SteerSpec(features=[(active, 0.0)], mode="clamp"), 1).code_edit(x)
    assert (z_new != z).any(0).nonzero().flatten().tolist() == [active]


def test_expert_ablation_changes_the_output_and_leaves_other_experts_codes(lm, sae, hook):
    tokens, acts = prompt_acts(lm, hook)
    x = acts[0]
    codes = sae.encode(sae.normalise(x))
    E = int(torch.bincount(codes.expert_indices.flatten(), minlength=4).argmax())
    m = sae.cfg.expert_width
    fn = Intervention(sae, SteerSpec(ablate_expert=E), tokens.shape[1])
    z, z_new, delta = fn.code_edit(x)
    own = slice(E * m, (E + 1) * m)
    assert bool((z[:, own] > 0).any())
    assert bool((z_new[:, own] == 0).all())
    others = torch.ones(z.shape[1], dtype=torch.bool)
    others[own] = False
    assert torch.equal(z_new[:, others], z[:, others])
    assert float(delta.norm()) > 0
    base = lm.logits(tokens)
    ablated = lm.logits_with_hook(tokens, hook, fn)
    assert float((ablated - base).abs().max()) > 1e-3
    r = steer(lm, sae, hook, PROMPT, SteerSpec(ablate_expert=E, max_new_tokens=3))
    assert len(r.steered_fires["experts"]) == 4
    assert no_hooks_left(lm)


@pytest.mark.parametrize("arch", ["scale", "switch"])
def test_force_routing_uses_only_the_chosen_expert(lm, hook, arch):
    sae = fitted_sae(lm, hook, arch=arch, active=1 if arch == "switch" else 2)
    _, acts = prompt_acts(lm, hook)
    x = acts[0]
    m = sae.cfg.expert_width
    for E in range(sae.cfg.experts):
        _, z_new, _ = Intervention(sae, SteerSpec(force_expert=E), 1).code_edit(x)
        outside = torch.ones(z_new.shape[1], dtype=torch.bool)
        outside[E * m : (E + 1) * m] = False
        assert bool((z_new[:, outside] == 0).all())
    if arch == "switch":
        # where the router already chose E, the forced code is the routed one without p_{i*}
        xn = sae.normalise(x)
        codes = sae.encode(xn)
        E = int(codes.expert_indices[0, 0])
        acts_f, idx_f = forced_codes(sae, xn, E)
        rows = codes.expert_indices[:, 0] == E
        routed = sae.dense_codes(codes)[rows]
        forced = torch.zeros_like(routed).scatter_(1, idx_f[rows], acts_f[rows])
        assert torch.allclose(forced * codes.expert_weights[rows], routed, atol=1e-6)


def test_generated_positions_leave_the_prompt_unsteered(lm, sae, hook):
    tokens, acts = prompt_acts(lm, hook)
    P = tokens.shape[1]
    fn = Intervention(sae, SteerSpec(features=[(3, 10.0)], positions="generated"), prompt_len=P - 2)
    out = fn.apply(acts, offset=0)
    assert torch.equal(out[:, : P - 3], acts[:, : P - 3])
    assert not torch.equal(out[:, P - 3 :], acts[:, P - 3 :])
    # a KV-cached loop calls once with the prompt, then one new position at a time
    fn = Intervention(sae, SteerSpec(features=[(3, 10.0)], positions="generated"), prompt_len=P)
    first = fn(acts)
    assert torch.equal(first[:, : P - 1], acts[:, : P - 1])
    step = fn(acts[:, -1:])
    assert not torch.equal(step, acts[:, -1:])


def test_all_positions_skip_bos_when_asked(lm, sae, hook):
    tokens, acts = prompt_acts(lm, hook)
    spec = SteerSpec(features=[(3, 10.0)])
    out = Intervention(sae, spec, tokens.shape[1], skip_bos=True).apply(acts)
    assert torch.equal(out[:, 0], acts[:, 0])
    assert not torch.equal(out[:, 1], acts[:, 1])
    assert not torch.equal(Intervention(sae, spec, tokens.shape[1]).apply(acts)[:, 0], acts[:, 0])


def test_token_diff_marks_changed_tokens():
    a, b = token_diff([1, 2, 3, 4], [1, 9, 3, 4, 5])
    assert a == [False, True, False, False]
    assert b == [False, True, False, False, True]


# -- cache ---------------------------------------------------------------------------------------
def test_spec_key_is_canonical():
    s1 = SteerSpec(features=[(1, 2.0), (3, 4)], seed=1)
    s2 = SteerSpec(features=[(3, 4.0), (1, 2)], seed=1)
    k = spec_key("m", "sae@x", "hi", s1)
    assert k == spec_key("m", "sae@x", "hi", s2) and len(k) == 64
    assert k != spec_key("m", "sae@x", "hi", SteerSpec(features=[(1, 2.0), (3, 4.5)], seed=1))
    assert k != spec_key("m", "sae@x", "hi", SteerSpec(features=[(1, 2.0), (3, 4)], seed=2))
    assert k != spec_key("m", "sae@x", "hi ", s1)
    assert k != spec_key("m2", "sae@x", "hi", s1)
    assert k != spec_key("m", "sae@x", "hi", SteerSpec(features=[(1, 2.0), (3, 4)], seed=1, mode="clamp"))


def test_cache_hits_return_the_stored_result(tmp_path):
    cache = SteeringCache(tmp_path / "b.duckdb")
    calls = []

    def compute():
        calls.append(1)
        return SteerResult("a", "b", [1, 2], [1, 3], 1, prompt_tokens=[0], spec={"mode": "add"})

    first = cached_steer(cache, "k1", compute)
    second = cached_steer(cache, "k1", compute)
    assert len(calls) == 1
    assert not first.cached and second.cached
    assert second.to_dict() == first.to_dict()
    cached_steer(cache, "k2", compute)
    assert len(calls) == 2


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, prompt, match",
    [
        (SteerSpec(features=[(64, 1.0)]), PROMPT, "out of range: this SAE has 64 features"),
        (SteerSpec(features=[(-1, 1.0)]), PROMPT, "out of range"),
        (SteerSpec(features=[(1, 1.0)]), "   ", "prompt is empty"),
        (SteerSpec(features=[(1, 1.0)], mode="boost"), PROMPT, "Unknown steering mode"),
        (SteerSpec(ablate_expert=4), PROMPT, "Expert 4 is out of range"),
        (SteerSpec(), PROMPT, "Nothing to steer"),
        (SteerSpec(features=[(1, 1.0), (1, 2.0)]), PROMPT, "listed twice"),
        (SteerSpec(features=[(1, 1.0)], top_p=0.0), PROMPT, "top-p"),
    ],
)
def test_bad_requests_give_one_clear_sentence(lm, sae, hook, spec, prompt, match):
    with pytest.raises(ConfigError, match=match) as exc:
        steer(lm, sae, hook, prompt, spec)
    assert str(exc.value).count(".") <= 2 and "\n" not in str(exc.value)
    assert no_hooks_left(lm)


def test_expert_interventions_need_a_moe_sae(lm, hook):
    dense = fitted_sae(lm, hook, arch="topk")
    with pytest.raises(ConfigError, match="needs a MoE SAE"):
        steer(lm, dense, hook, PROMPT, SteerSpec(ablate_expert=0))


# -- the command line ----------------------------------------------------------------------------
def write_build(tmp_path, saes: dict, hook: str):
    """A minimal build whose `saes` rows point at saved checkpoints (as `moesae build` writes)."""
    db = tmp_path / "b.duckdb"
    with BuildWriter(db) as w:
        for name, sae in saes.items():
            folder = save_sae(sae, tmp_path / name, {"model": TINY_MODEL, "hook": hook})
            cfg = {**sae.cfg.to_dict(), "checkpoint": str(folder)}
            w.insert("saes", {
                "sae": [name], "model": [TINY_MODEL], "hook": [hook], "arch": [sae.cfg.arch],
                "width": np.array([sae.cfg.width]), "experts": np.array([sae.cfg.experts]),
                "active": np.array([sae.cfg.active]), "k": np.array([sae.cfg.k]),
                "config": [json.dumps(cfg)],
            })
    return db


def run_cli(argv, capsys):
    p = argparse.ArgumentParser()
    steer_cli.add(p.add_subparsers())
    rc = steer_cli.run(p.parse_args(["steer", *argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_prints_default_and_steered_lines_and_caches_beside_the_build(lm, sae, hook, tmp_path, capsys):
    dense = fitted_sae(lm, hook, arch="topk")
    db = write_build(tmp_path, {"moe": sae, "dense": dense}, hook)
    before = db.read_bytes()
    argv = ["--db", str(db), "--prompt", PROMPT, "--feature", "11", "--strength", "40",
            "--feature", "3", "--strength", "-2", "--max-new-tokens", "4", "--seed", "1"]
    with open_db(db):  # the explorer holds the build open read-only meanwhile
        rc, out, err = run_cli(argv, capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("default: ") and lines[1].startswith("steered: ")
    assert "using SAE 'moe' (the only MoE SAE" in err
    assert db.read_bytes() == before  # the build itself is never written
    assert (tmp_path / "b.duckdb.steer.duckdb").exists()

    rc, out2, err2 = run_cli(argv, capsys)
    assert rc == 0 and out2 == out and "from cache" in err2

    rc, out3, _ = run_cli([*argv, "--json", "--sae", "dense"], capsys)
    payload = json.loads(out3)
    assert payload["sae"] == "dense" and payload["cached"] is False
    assert len(payload["steered_tokens"]) <= 4


def test_cli_errors(lm, sae, hook, tmp_path, capsys):
    db = write_build(tmp_path, {"a": sae, "b": sae}, hook)
    base = ["--db", str(db), "--prompt", PROMPT, "--feature", "1", "--strength", "1"]
    with pytest.raises(ConfigError, match="several SAEs; choose one with --sae"):
        run_cli(base, capsys)
    with pytest.raises(ConfigError, match="Unknown SAE 'zzz'.*available: a, b"):
        run_cli([*base, "--sae", "zzz"], capsys)
    with pytest.raises(ConfigError, match="Feature 999 is out of range"):
        run_cli(["--db", str(db), "--sae", "a", "--prompt", "x", "--feature", "999", "--strength", "1"], capsys)
    with pytest.raises(ConfigError, match="prompt is empty"):
        run_cli(["--db", str(db), "--sae", "a", "--prompt", "", "--feature", "1", "--strength", "1"], capsys)
    with pytest.raises(ConfigError, match="one strength per feature"):
        run_cli([*base, "--sae", "a", "--feature", "2", "--feature", "3", "--strength", "2"], capsys)
    with pytest.raises(UserError, match="No build file"):
        run_cli(["--db", str(tmp_path / "missing.duckdb"), "--prompt", "x", "--feature", "1", "--strength", "1"], capsys)

