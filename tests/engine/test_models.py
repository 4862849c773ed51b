import pytest
import torch

from engine.errors import ModelError
from engine.models import DEFAULT_MODEL, load_model


def _tokens(lm, texts=("The quick brown fox jumps over the lazy dog.", "def f(x): return x + 1")):
    ids = lm.tokenize(list(texts))
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


def test_tiny_model_shape(tiny_model):
    assert (tiny_model.n_layers, tiny_model.d_model) == (2, 64)
    assert tiny_model.has_lm_head
    assert tiny_model.bos_token_id is not None
    assert tiny_model.unembed_matrix().shape == (64, len(tiny_model.tokenizer))


def test_default_hook_is_middle_residual(tiny_model):
    assert tiny_model.resolve_hook(None) == "blocks.1.hook_resid_post"
    assert tiny_model.hook_layer("blocks.0.hook_resid_post") == 0
    assert "blocks.0.hook_resid_post" in tiny_model.hook_names()


def test_unknown_hook_lists_nearest_names(tiny_model):
    with pytest.raises(ModelError) as e:
        tiny_model.resolve_hook("blocks.0.resid_post")
    msg = str(e.value)
    assert msg.startswith("Unknown hook 'blocks.0.resid_post' for model tiny-random")
    assert "nearest valid hooks: " in msg and "blocks.0.hook_resid_post" in msg
    assert msg.endswith(".")


def test_tokenize_prepends_bos_once(tiny_model):
    (ids,) = tiny_model.tokenize(["hello world"])
    assert ids[0] == tiny_model.bos_token_id and ids.count(tiny_model.bos_token_id) == 1
    assert tiny_model.tokenize(["hello world"], prepend_bos=False)[0] == ids[1:]
    assert "".join(tiny_model.token_strs(ids[1:])) == "hello world"
    assert tiny_model.decode(ids) == "hello world"


def test_activations_stop_early_but_match_full_run(tiny_model):
    tokens = _tokens(tiny_model)
    hook = "blocks.0.hook_resid_post"
    _, cache = tiny_model.model.run_with_cache(tokens)
    later_calls = []

    def spy(act, hook):
        later_calls.append(hook.name)

    with tiny_model.model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", spy)]):
        act = tiny_model.activations(tokens, hook)
    assert act.shape == (*tokens.shape, 64)
    torch.testing.assert_close(act, cache[hook])
    assert later_calls == []  # block 1 never ran


def test_logits_with_identity_hook_equal_logits(tiny_model):
    tokens = _tokens(tiny_model)
    logits = tiny_model.logits(tokens)
    assert logits.shape == (*tokens.shape, len(tiny_model.tokenizer))
    same = tiny_model.logits_with_hook(tokens, "blocks.0.hook_resid_post", lambda a: a)
    torch.testing.assert_close(same, logits)
    zeroed = tiny_model.logits_with_hook(tokens, "blocks.0.hook_resid_post", torch.zeros_like)
    assert not torch.allclose(zeroed, logits)


def test_hooks_removed_after_exception(tiny_model):
    tokens = _tokens(tiny_model)
    hook = "blocks.0.hook_resid_post"
    before = tiny_model.logits(tokens)

    def boom(act):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_model.logits_with_hook(tokens, hook, boom)
    assert all(not hp.fwd_hooks for hp in tiny_model.model.hook_dict.values())
    torch.testing.assert_close(tiny_model.logits(tokens), before)


def test_final_norm_matches_model(tiny_model):
    tokens = _tokens(tiny_model)
    resid = tiny_model.activations(tokens, "blocks.1.hook_resid_post")
    logits = tiny_model.final_norm(resid) @ tiny_model.unembed_matrix()
    torch.testing.assert_close(logits, tiny_model.logits(tokens), atol=1e-4, rtol=1e-4)


def test_generate_is_deterministic(tiny_model):
    prompt = tiny_model.to_tokens("Once upon a time")
    greedy = tiny_model.generate(prompt, max_new_tokens=5)
    assert greedy == tiny_model.generate(prompt, max_new_tokens=5) and 0 < len(greedy) <= 5
    a = tiny_model.generate(prompt, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    assert a == tiny_model.generate(prompt, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    steered = tiny_model.generate(
        prompt, max_new_tokens=5, hook="blocks.0.hook_resid_post", fn=lambda act: act * 0
    )
    assert len(steered) <= 5
    assert all(not hp.fwd_hooks for hp in tiny_model.model.hook_dict.values())


def test_unreachable_hub_name_is_a_model_error(monkeypatch):
    def offline(source, device):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("engine.models._boot", offline)
    with pytest.raises(ModelError, match="Could not load model 'someone/some-model'"):
        load_model("someone/some-model")


def test_folder_without_config_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_default_model_loads_offline():
    lm = load_model(DEFAULT_MODEL)
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert lm.resolve_hook(None) == "blocks.15.hook_resid_post"
    out = lm.decode(lm.generate(lm.to_tokens("The capital of France is"), max_new_tokens=8))
    assert "Paris" in out


def test_check_sae_width(tiny_model):
    from engine.sae import SAEConfig, build_sae

    tiny_model.check_sae(build_sae(SAEConfig(arch="topk", d_in=64, width=128, k=4)))
    with pytest.raises(ModelError) as e:
        tiny_model.check_sae(build_sae(SAEConfig(arch="topk", d_in=8, width=32, k=4)))
    assert str(e.value) == (
        "The SAE reads 8-dimensional activations (d_in=8) but model tiny-random has d_model=64."
    )
