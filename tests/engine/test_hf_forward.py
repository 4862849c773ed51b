"""The direct (Hugging Face) forward path against TransformerLens's bridge, its reference."""

import contextlib

import pytest
import torch

from engine.hf_forward import TOLERANCE, DirectForward, agrees
from engine.models import DEFAULT_MODEL, TINY_MODEL, load_model


def _tokens(lm, batch=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, len(lm.tokenizer), (batch, length), generator=g)
    toks[:, 0] = lm.bos_token_id
    return toks


@contextlib.contextmanager
def _runs_of(module, before=False):
    """A list that gets one entry each time `module` runs (a pre-hook with before=True)."""
    ran = []
    register = module.register_forward_pre_hook if before else module.register_forward_hook
    handle = register(lambda *a: ran.append(1))
    try:
        yield ran
    finally:
        handle.remove()


def _hooks(lm):
    return [f"blocks.{L}.{name}" for L in range(lm.n_layers)
            for name in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]


@pytest.fixture
def fresh_model():
    """A model of its own (tests here change its `forward` and its per-hook checks)."""
    return load_model(TINY_MODEL)


def test_every_block_hook_matches_the_bridge(fresh_model):
    lm = fresh_model
    direct = DirectForward.of(lm.model)
    assert direct is not None and direct.attention == "sdpa"
    toks = lm._tokens(_tokens(lm))
    for hook in _hooks(lm):
        target = direct.target(hook)
        assert target is not None, hook
        got = direct.capture(toks, target)
        ref = lm.bridge_activations(toks, hook)
        ok, rel = agrees(got, ref)
        assert ok and rel < 1e-5, (hook, rel)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_activations_auto_equal_bridge_and_are_checked_once(fresh_model, monkeypatch):
    lm = fresh_model
    hook = "blocks.1.hook_resid_post"
    toks = _tokens(lm, batch=4)
    ref = lm.bridge_activations(toks, hook)
    calls = []
    real = lm.bridge_activations
    monkeypatch.setattr(lm, "bridge_activations", lambda t, h: calls.append(t.shape) or real(t, h))
    first = lm.activations(toks, hook)
    second = lm.activations(toks, hook)
    assert calls == [(2, toks.shape[1])]  # one check, on the first batch's first two contexts
    assert lm._direct_ok[hook] is True
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)


def test_direct_tree_shares_weights_and_leaves_the_bridge_alone(fresh_model):
    lm = fresh_model
    hf = lm.model.original_model
    direct = DirectForward.of(lm.model)
    ours = list(direct.root.parameters())
    theirs = {p.data_ptr() for p in hf.parameters()}
    assert ours and all(p.data_ptr() in theirs for p in ours)  # the same tensors, no copy
    assert hf.config._attn_implementation == "eager"  # the bridge's own config is untouched
    # no bridge component, no hook point in the copy
    assert not any(hasattr(m, "original_component") for m in direct.root.modules())
    # a hook on the copy does not fire on the bridge's module
    with _runs_of(direct.target("blocks.0.hook_resid_post")[0]) as fired:
        lm.bridge_activations(_tokens(lm), "blocks.1.hook_resid_post")
    assert fired == []


def test_direct_pass_stops_at_the_hook(fresh_model):
    lm = fresh_model
    direct = lm._direct = DirectForward.of(lm.model)  # the tree `activations` runs
    with _runs_of(direct.target("blocks.1.hook_resid_pre")[0], before=True) as ran:
        lm.activations(_tokens(lm), "blocks.0.hook_resid_post")
    assert lm._direct_ok["blocks.0.hook_resid_post"] is True
    assert ran == []  # block 1 never ran


def test_unmapped_hook_reads_the_bridge(fresh_model):
    lm = fresh_model
    hook = "blocks.0.attn.hook_pattern" if "blocks.0.attn.hook_pattern" in lm.hook_names() \
        else "hook_embed"
    direct = DirectForward.of(lm.model)
    assert direct.target(hook) is None
    toks = _tokens(lm)
    torch.testing.assert_close(lm.activations(toks, hook), lm.bridge_activations(toks, hook))
    assert hook not in lm._direct_ok


def test_disagreement_falls_back_to_the_bridge_with_one_note(fresh_model, capsys):
    lm = fresh_model
    hook = "blocks.1.hook_resid_post"
    direct = DirectForward.of(lm.model)
    direct._targets[hook] = direct.target("blocks.0.hook_resid_post")  # the wrong layer
    lm._direct = direct
    toks = _tokens(lm)
    got = lm.activations(toks, hook)
    torch.testing.assert_close(got, lm.bridge_activations(toks, hook))
    assert lm._direct_ok[hook] is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "through TransformerLens's bridge" in err and "differed" in err
    captured = []
    direct.capture = lambda *a: captured.append(1)
    lm.activations(toks, hook)  # decided once: no second attempt, no second note
    assert captured == [] and capsys.readouterr().err == ""


def test_bridge_mode_and_bridge_hooks_use_the_bridge(fresh_model):
    lm = fresh_model
    hook = "blocks.1.hook_resid_post"
    toks = _tokens(lm)
    lm.forward = "bridge"
    assert lm._direct_path(hook) is None
    lm.forward = "auto"
    clean = lm.activations(toks, hook)
    assert lm._direct_ok[hook] is True
    with lm.hooked("blocks.0.hook_resid_post", lambda a: a * 2):  # only the bridge runs it
        assert lm._direct_path(hook) is None
        hooked = lm.activations(toks, hook)
        torch.testing.assert_close(hooked, lm.bridge_activations(toks, hook))
    assert not torch.allclose(hooked, clean)


def test_instance_forward_refuses_the_direct_path(fresh_model):
    inner = fresh_model.model.blocks[0].original_component
    inner.forward = inner.forward  # as accelerate's dispatch hooks do
    try:
        assert DirectForward.of(fresh_model.model) is None
    finally:
        del inner.forward
    assert DirectForward.of(fresh_model.model) is not None


def test_agrees_on_hand_made_cases():
    ref = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    ok, rel = agrees(ref.clone(), ref)
    assert ok and rel == 0.0
    off = ref.clone()
    off[0] = torch.tensor([3.0, 4.5])  # token 0 off by 0.5 / 5 = 0.1, the others exact
    assert agrees(off, ref) == (False, 0.0)  # the median token is exact, the 90th percentile not
    many = torch.cat([ref[1:]] * 10 + [ref[:1]])  # 20 exact tokens and one
    many_off = torch.cat([ref[1:]] * 10 + [off[:1]])
    assert agrees(many_off, many) == (True, 0.0)  # one token in 21: within the 90th percentile
    off[1] = torch.tensor([0.0, 1.1])  # now two of three tokens are off: median 0.1
    ok, rel = agrees(off, ref)
    assert not ok and rel == pytest.approx(0.1)
    assert agrees(off.bfloat16(), ref.bfloat16())[0] is (0.1 <= TOLERANCE[torch.bfloat16])
    assert agrees(ref[:2], ref) == (False, float("inf"))  # shape
    assert agrees(ref.double(), ref) == (False, float("inf"))  # dtype
    nan = ref.clone()
    nan[2, 0] = float("nan")
    assert agrees(nan, ref)[0] is False
    assert agrees(torch.zeros(2, 2), torch.zeros(2, 2)) == (True, 0.0)


def test_bfloat16_model_agrees_within_its_tolerance():
    lm = load_model(TINY_MODEL, dtype="bfloat16")
    toks = _tokens(lm)
    direct = DirectForward.of(lm.model)
    for hook in _hooks(lm):
        ok, rel = agrees(direct.capture(lm._tokens(toks), direct.target(hook)),
                         lm.bridge_activations(toks, hook))
        assert ok, (hook, rel)


def test_harvest_stores_the_same_activations_either_way(tmp_path):
    from engine.data.harvest import HarvestConfig, harvest
    from engine.options import set_flat

    stores = {}
    for mode in ("auto", "bridge"):
        lm = load_model(TINY_MODEL)
        cfg = set_flat(HarvestConfig(), dict(model=TINY_MODEL, tokens=1500, context_len=32,
                                             seed=1, out=str(tmp_path / mode), model_forward=mode))
        stores[mode] = harvest(cfg, progress=False, model=lm)
        assert lm._direct_ok.get(stores[mode].hook) is (True if mode == "auto" else None)
    for split in ("train", "eval"):
        a, b = stores["auto"].split(split), stores["bridge"].split(split)
        assert len(a) == len(b) > 0
        torch.testing.assert_close(torch.from_numpy(a.slice(0, len(a)).astype("float32")),
                                   torch.from_numpy(b.slice(0, len(b)).astype("float32")),
                                   rtol=2e-3, atol=2e-3)  # float16 storage


@pytest.mark.slow
def test_default_model_layer_15_matches_the_bridge():
    lm = load_model(DEFAULT_MODEL)
    toks = _tokens(lm, batch=2, length=64)
    for hook in ("blocks.15.hook_resid_post", "blocks.29.hook_resid_post", "blocks.15.hook_mlp_out"):
        lm._direct_ok.clear()
        got = lm.activations(toks, hook)
        assert lm._direct_ok[hook] is True
        torch.testing.assert_close(got, lm.bridge_activations(toks, hook), rtol=1e-4, atol=1e-3)


def test_logits_and_replaced_logits_match_the_bridge(fresh_model):
    lm = fresh_model
    toks = lm._tokens(_tokens(lm))  # on the model's device: the bridge is called with them too
    clean = lm.logits(toks)
    assert lm._direct_ok["logits"] is True
    torch.testing.assert_close(clean, lm.model(toks, return_type="logits"), rtol=1e-5, atol=1e-5)
    for hook in _hooks(lm):
        def fn(a):
            return a * 0.5 + 1.0

        got = lm.logits_with_hook(toks, hook, fn)
        assert lm._direct_ok[hook] is True, hook
        ref = lm.model.run_with_hooks(toks, fwd_hooks=[(hook, lambda a, hook: fn(a))],
                                      return_type="logits")
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, clean, atol=1e-3)  # the replacement took effect
    # the hook is gone afterwards, also when fn raises
    with pytest.raises(ZeroDivisionError):
        lm.logits_with_hook(toks, "blocks.0.hook_resid_post", lambda a: 1 / 0)
    torch.testing.assert_close(lm.logits(toks), clean)


def test_steered_generation_is_the_same_either_way(fresh_model):
    lm = fresh_model
    prompt = lm.to_tokens("The capital of France is")  # checked on its tokens repeated
    hook = "blocks.1.hook_resid_pre"
    g = torch.Generator().manual_seed(3)
    push = (torch.randn(lm.d_model, generator=g) * 4).to(lm.device)

    def fn(a):
        return a + push

    direct = lm.generate(prompt, max_new_tokens=12, hook=hook, fn=fn, stop_at_eos=False)
    assert lm._direct_ok[hook] is True and lm._direct_ok["logits"] is True
    lm.forward = "bridge"
    bridge = lm.generate(prompt, max_new_tokens=12, hook=hook, fn=fn, stop_at_eos=False)
    plain = lm.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    assert direct == bridge and direct != plain


def _bridge_splice(lm, toks, hook, fn):
    return lm.model.run_with_hooks(toks, fwd_hooks=[(hook, lambda a, hook: fn(a))],
                                   return_type="logits")


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                  "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
def test_spliced_resumes_after_the_hook_as_a_whole_pass_would(fresh_model, hook):
    lm = fresh_model
    toks = lm._tokens(_tokens(lm))
    direct = DirectForward.of(lm.model)
    lm._direct = direct
    first = direct._memo[id(lm.model.embed)]  # the token embedding, before every block
    logits, act, resume = lm.spliced(toks, hook)
    assert lm._direct_ok[f"{hook}, resumed after it"] is True
    torch.testing.assert_close(logits, lm.model(toks, return_type="logits"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act, lm.bridge_activations(toks, hook), rtol=1e-5, atol=1e-5)
    with _runs_of(first, before=True) as ran_before:
        for fn in (lambda a: torch.zeros_like(a), lambda a: a * 0.5 + 1.0):
            before = act.clone()
            got = resume(fn(act))
            torch.testing.assert_close(got, _bridge_splice(lm, toks, hook, fn), rtol=1e-4, atol=1e-4)
            assert torch.equal(act, before)
    assert ran_before == []  # resuming never embeds the tokens again


def test_spliced_falls_back_to_whole_passes(fresh_model, capsys):
    lm = fresh_model
    toks = lm._tokens(_tokens(lm))
    fn = lambda a: a * 0.5 + 1.0  # noqa: E731
    for hook in ("blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"):  # not a block's / bridge
        lm.forward = "bridge" if hook.endswith("resid_post") else "auto"
        logits, act, resume = lm.spliced(toks, hook)
        torch.testing.assert_close(logits, lm.model(toks, return_type="logits"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(resume(fn(act)), _bridge_splice(lm, toks, hook, fn),
                                   rtol=1e-4, atol=1e-4)
        assert f"{hook}, resumed after it" not in lm._direct_ok
    # a model doing more after its last block than the bridge's norm and unembedding: the
    # check on the first batch catches it, says so once, and whole passes are used
    lm.forward = "auto"
    hook = "blocks.0.hook_resid_post"
    direct = DirectForward.of(lm.model)
    direct._memo[id(lm.model.ln_final)] = torch.nn.Identity()
    lm._direct, lm._direct_ok = direct, {}
    logits, act, resume = lm.spliced(toks, hook)
    assert lm._direct_ok[f"{hook}, resumed after it"] is False
    assert "through whole forward passes" in capsys.readouterr().err
    torch.testing.assert_close(resume(fn(act)), _bridge_splice(lm, toks, hook, fn), rtol=1e-4, atol=1e-4)


def test_short_inputs_are_checked_tiled_and_longer_ones_checked_again(fresh_model, monkeypatch):
    from engine.models import MIN_CHECK_TOKENS

    lm = fresh_model
    hook = "blocks.1.hook_resid_post"
    checks = []
    real = lm.bridge_activations
    monkeypatch.setattr(lm, "bridge_activations", lambda t, h: checks.append(t) or real(t, h))
    short = lm._tokens(_tokens(lm, length=5))
    got = lm.activations(short, hook)
    assert lm._direct_ok[hook] is True and len(checks) == 1
    probe = checks[0]  # the first two contexts, repeated to the minimum length
    assert probe.shape == (2, MIN_CHECK_TOKENS)
    assert torch.equal(probe, short[:2].repeat(1, 4)[:, :MIN_CHECK_TOKENS])
    torch.testing.assert_close(got, real(short, hook), rtol=1e-5, atol=1e-5)
    lm.activations(_tokens(lm, length=2 * MIN_CHECK_TOKENS), hook)  # up to twice as long: trusted
    assert len(checks) == 1
    lm.activations(_tokens(lm, length=2 * MIN_CHECK_TOKENS + 1), hook)  # longer: checked again
    assert [c.shape for c in checks] == [(2, MIN_CHECK_TOKENS), (2, 2 * MIN_CHECK_TOKENS + 1)]
    assert lm._checked_len[hook] == 2 * MIN_CHECK_TOKENS + 1


def test_hooks_the_bridge_can_replace_but_not_read_alone_still_work(fresh_model, capsys):
    lm = fresh_model
    toks = _tokens(lm)
    hook = "hook_pos_embed" if "hook_pos_embed" in lm.hook_names() else "blocks.0.hook_resid_pre"
    got = lm.logits_with_hook(toks, hook, lambda a: a)
    ref = lm.model.run_with_hooks(lm._tokens(toks), fwd_hooks=[(hook, lambda a, hook: a)],
                                  return_type="logits")
    torch.testing.assert_close(got, ref)
    capsys.readouterr()


def test_a_replacement_returning_none_changes_nothing(fresh_model):
    lm = fresh_model
    toks = _tokens(lm)
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"):
        torch.testing.assert_close(lm.logits_with_hook(toks, hook, lambda a: None), lm.logits(toks))
        assert lm._direct_ok[hook] is True


def test_a_moved_model_gets_a_new_copy(fresh_model):
    lm = fresh_model
    hook = "blocks.1.hook_resid_post"
    toks = _tokens(lm)
    lm.activations(toks, hook)
    before = lm._direct
    lm.model.to(torch.float64)
    got = lm.activations(toks, hook)
    assert lm._direct is not before and got.dtype == torch.float64
    assert lm._direct_ok[hook] is True
    torch.testing.assert_close(got, lm.bridge_activations(toks, hook))


def test_cached_steps_give_the_whole_sequence_logits(fresh_model):
    lm = fresh_model
    direct = DirectForward.of(lm.model)
    seq = lm._tokens(_tokens(lm, batch=1, length=20))
    logits, cache = direct.step(seq)
    torch.testing.assert_close(logits, lm.model(seq, return_type="logits")[:, -1:],
                               rtol=1e-5, atol=1e-5)
    for nxt in (5, 17, 300):
        seq = torch.cat([seq, seq.new_tensor([[nxt]])], 1)
        logits, cache = direct.step(seq[:, -1:], cache)  # one new position
        torch.testing.assert_close(logits, lm.model(seq, return_type="logits")[:, -1:],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steering_with_a_kv_cache_matches_the_bridge_without_one(fresh_model, positions):
    from engine.sae import SAEConfig, build_sae
    from engine.steering.intervention import Intervention
    from engine.steering.run import generate_steered
    from engine.steering.spec import SteerSpec

    lm = fresh_model
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="scale", d_in=lm.d_model, width=64, experts=4, active=2,
                              k=4)).eval().to(lm.device)  # as run.py puts it beside the model
    prompt = lm.to_tokens("One two three four five six")
    hook = lm.default_hook
    spec = SteerSpec(features=[(3, 30.0), (40, -10.0)], positions=positions)
    sample = dict(max_new_tokens=10, stop_at_eos=False)
    out = {}
    for forward in ("auto", "bridge"):
        lm.forward = forward
        out[forward] = generate_steered(lm, prompt, hook, Intervention(sae, spec, prompt.shape[1]),
                                        sample)
    assert lm._direct_ok[hook] is True  # the auto run took the cached direct path
    lm.forward = "auto"
    plain = lm.generate(prompt, **sample)
    assert out["auto"] == out["bridge"] and out["auto"] != plain


def test_a_direct_path_that_fails_on_its_first_pass_falls_back(fresh_model, capsys):
    lm = fresh_model
    hook = "blocks.1.hook_resid_post"
    direct = lm._direct = DirectForward.of(lm.model)

    def broken(*a, **k):
        raise TypeError("unexpected keyword argument 'input_ids'")

    direct.root.forward = broken
    toks = _tokens(lm)
    torch.testing.assert_close(lm.activations(toks, hook), lm.bridge_activations(toks, hook))
    err = capsys.readouterr().err
    assert lm._direct_ok[hook] is False and "failed (TypeError" in err and err.count("\n") == 1


def test_an_unknown_model_forward_is_one_sentence_before_anything_is_written(tmp_path):
    from engine.data.harvest import HarvestConfig, harvest
    from engine.errors import ConfigError
    from engine.options import set_flat

    cfg = set_flat(HarvestConfig(), dict(model=TINY_MODEL, tokens=500, out=str(tmp_path / "h"),
                                         model_forward="fast"))
    with pytest.raises(ConfigError) as e:
        harvest(cfg, progress=False)
    assert str(e.value) == "model_forward must be one of auto, bridge, got 'fast'."
    assert not (tmp_path / "h").exists()
