"""The direct (Hugging Face) forward path on other model families than Llama: tiny random models
of each, built from their config offline (the SmolLM2 tokenizer, two blocks), loaded as a local
folder through TransformerLens's bridge. On each, every block hook the direct path can read
agrees with the bridge and is used; the logits, CE's resumed pass and KV-cached generation
match the bridge's."""

import contextlib
import io

import pytest
import torch

from engine.models import TINY_MODEL, _ensure_tiny, load_model

SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256)
GQA = dict(SIZE, num_key_value_heads=2)
FAMILIES = {
    # family: (config class in transformers, its arguments, hooks the bridge reads alone)
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256), ()),
    "gpt_neox": ("GPTNeoXConfig", SIZE, ()),
    "qwen2": ("Qwen2Config", GQA, ()),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=16), ()),
    "mistral": ("MistralConfig", GQA, ()),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=16), ()),
    "gemma3": ("Gemma3TextConfig", dict(GQA, head_dim=16), ()),
    "phi3": ("Phi3Config", dict(GQA, pad_token_id=0), ()),
    # OPT's MLP runs on the tokens flattened to [B·T, d]: its output is not the hook's shape,
    # so the first check sends hook_mlp_out to the bridge (with one note)
    "opt": ("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64),
            ("hook_mlp_out",)),
}
HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_ensure_tiny())
    root = tmp_path_factory.mktemp("families")

    def build(family):
        cls_name, kwargs, _ = FAMILIES[family]
        cls = getattr(transformers, cls_name)
        folder = root / family
        if not folder.exists():
            config = cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **kwargs)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return folder

    return build


def _quiet(fn):
    """fn()'s result and what it wrote to stderr (the direct path's notes)."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        result = fn()
    return result, out.getvalue()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_direct_path_on_other_model_families(family_dir, family):
    lm = load_model(str(family_dir(family)), device="cpu")
    assert lm.name != TINY_MODEL
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, len(lm.tokenizer), (3, 24), generator=g)
    toks[:, 0] = lm.bos_token_id
    bridge_only = FAMILIES[family][2]
    for L in range(lm.n_layers):
        for name in HOOKS:
            hook = f"blocks.{L}.{name}"
            lm.forward = "bridge"
            ref = lm.activations(toks, hook)
            lm.forward = "auto"
            got, said = _quiet(lambda: lm.activations(toks, hook))  # noqa: B023
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            used = lm._direct_ok.get(hook)
            assert used is (name not in bridge_only), (hook, said)
            assert ("through TransformerLens's bridge" in said) is (not used)

    lm.forward = "bridge"
    ref_logits = lm.logits(toks)
    lm.forward = "auto"
    torch.testing.assert_close(lm.logits(toks), ref_logits, rtol=1e-5, atol=1e-5)
    assert lm._direct_ok["logits"] is True

    hook = "blocks.0.hook_resid_post"
    fn = lambda a: a * 0.5 + 1.0  # noqa: E731
    (logits, act, resume), _ = _quiet(lambda: lm.spliced(toks, hook))
    assert lm._direct_ok[f"{hook}, resumed after it"] is True
    ref = lm.model.run_with_hooks(toks, fwd_hooks=[(hook, lambda a, hook: fn(a))],
                                  return_type="logits")
    torch.testing.assert_close(resume(fn(act)), ref, rtol=1e-4, atol=1e-3)

    prompt = lm.to_tokens("One two three four five six")
    sample = dict(max_new_tokens=12, stop_at_eos=False)
    cached = lm.generate(prompt, **sample)
    lm.forward = "bridge"
    assert cached == lm.generate(prompt, **sample)
