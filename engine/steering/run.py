"""Running a steering request: the default and the steered continuation of one prompt with
the same seed, and which features and experts fire on each."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ConfigError, ModelError
from .intervention import Intervention
from .spec import SteerSpec, check_prompt

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..sae import SparseAutoencoder


@dataclass
class SteerResult:
    """A default and a steered continuation of the same prompt with the same seed."""

    default_text: str
    """The unsteered continuation (prompt excluded)."""
    steered_text: str
    """The steered continuation (prompt excluded)."""
    default_tokens: list[int]
    """Generated token ids, unsteered."""
    steered_tokens: list[int]
    """Generated token ids, steered."""
    first_diff: int | None
    """Index of the first generated token that differs (None when the two are identical)."""
    prompt_tokens: list[int] = field(default_factory=list)
    """The prompt's token ids (BOS first, as the model read it)."""
    default_token_strs: list[str] = field(default_factory=list)
    steered_token_strs: list[str] = field(default_factory=list)
    default_fires: dict | None = None
    """`fire_summary` of the default continuation (what the SAE reads at the hook)."""
    steered_fires: dict | None = None
    """`fire_summary` of the steered continuation, on the activations after the intervention."""
    spec: dict = field(default_factory=dict)
    cached: bool = False
    """True when this came from the steering cache."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_dict(cls, d: dict, cached: bool = False) -> SteerResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known}, cached=cached)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_diff(a: Sequence[int], b: Sequence[int]) -> tuple[list[bool], list[bool]]:
    """Which tokens of `a` and of `b` are not part of their longest common alignment
    (difflib), i.e. the tokens to mark as changed in a side-by-side view."""
    mark_a, mark_b = [True] * len(a), [True] * len(b)
    sm = difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False)
    for blk in sm.get_matching_blocks():
        for i in range(blk.size):
            mark_a[blk.a + i] = False
            mark_b[blk.b + i] = False
    return mark_a, mark_b


@torch.no_grad()
def fire_summary(
    sae: SparseAutoencoder, acts_raw: Tensor, token_strs: Sequence[str], top: int = 12
) -> dict:
    """Which features and experts fire on activations [T, d]: the `top` features by total
    activation (feature, expert, max_act, n_tokens), each expert's share of tokens (top-1 and
    among the e active) and the top-1 expert of every token (None for dense SAEs)."""
    T = acts_raw.shape[0]
    out: dict[str, Any] = {"tokens": list(token_strs), "features": [], "experts": [], "top_expert": None}
    if T == 0:
        return out
    codes = sae.encode(sae.normalise(acts_raw.to(sae.W_dec.dtype)))
    z = sae.dense_codes(codes)
    total = z.sum(0)
    expert_of = sae.feature_expert()
    order = total.argsort(descending=True)[:top]
    for f in order.tolist():
        if float(total[f]) <= 0:
            break
        out["features"].append({
            "feature": int(f),
            "expert": int(expert_of[f]),
            "max_act": float(z[:, f].max()),
            "n_tokens": int((z[:, f] > 0).sum()),
        })
    if codes.expert_indices is not None and sae.cfg.experts > 1:
        N = sae.cfg.experts
        top1 = torch.bincount(codes.expert_indices[:, 0], minlength=N).float() / T
        active = torch.bincount(codes.expert_indices.reshape(-1), minlength=N).float() / T
        out["experts"] = [
            {"expert": i, "share_top1": float(top1[i]), "share_active": float(active[i])}
            for i in range(N)
        ]
        out["top_expert"] = [int(e) for e in codes.expert_indices[:, 0].tolist()]
    return out


def steer(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    hook: str,
    prompt: str,
    spec: SteerSpec,
    analyse: bool = True,
) -> SteerResult:
    """Generate the default and the steered continuation of `prompt` (same seed).

    The model is left unchanged: the hook only exists inside `generate`, which removes it in a
    `finally`. With `analyse`, also report which features/experts fire on each continuation.
    """
    check_prompt(prompt)
    spec.validate(sae.cfg.width, sae.cfg.experts)
    loaded.check_sae(sae)
    if not getattr(loaded, "has_lm_head", True):
        raise ModelError(f"Model {loaded.name} has no language-model head, so it cannot generate.")
    hook = loaded.resolve_hook(hook)
    device = torch.device(loaded.device)
    if sae.W_dec.device != device:  # the model may be on CUDA, a checkpoint loads on the CPU
        sae = sae.to(device)
    prompt_ids = loaded.tokenize([prompt])[0]
    if not prompt_ids:
        raise ConfigError("The prompt is empty after tokenisation; write some text.")
    tokens = torch.tensor([prompt_ids], dtype=torch.long)
    sample = dict(
        max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
        seed=spec.seed,
    )
    bos = getattr(loaded, "bos_token_id", None)
    fn = Intervention(sae, spec, prompt_len=len(prompt_ids),
                      skip_bos=bos is not None and prompt_ids[0] == bos)
    with loaded.lock, torch.no_grad():  # hooks live on the shared model: one call at a time
        default = loaded.generate(tokens, **sample)
        steered = generate_steered(loaded, tokens, hook, fn, sample)
        fires_d = fires_s = None
        if analyse:
            fires_d, fires_s = _summaries(loaded, sae, hook, prompt_ids, default, steered, fn)
    return SteerResult(
        default_text=loaded.decode(default),
        steered_text=loaded.decode(steered),
        default_tokens=list(default),
        steered_tokens=list(steered),
        first_diff=first_difference(default, steered),
        prompt_tokens=list(prompt_ids),
        default_token_strs=loaded.token_strs(default),
        steered_token_strs=loaded.token_strs(steered),
        default_fires=fires_d,
        steered_fires=fires_s,
        spec=spec.to_dict(),
    )


def generate_steered(loaded, tokens: Tensor, hook: str, fn: Intervention, sample: dict) -> list[int]:
    """`generate` with `fn` at `hook` (LoadedModel.generate registers the hook once for the
    whole loop and removes it on exit, even on error)."""
    return loaded.generate(tokens, hook=hook, fn=fn, **sample)


def _summaries(loaded, sae, hook, prompt_ids, default, steered, fn: Intervention):
    """Activations at the hook over prompt + continuation, read once per run: the hook's input
    does not depend on the intervention (it acts at this layer), so applying `fn` to the clean
    activations of the steered text gives exactly what the steered model saw there."""
    P = len(prompt_ids)
    out = []
    for gen, intervene in ((default, False), (steered, True)):
        seq = torch.tensor([list(prompt_ids) + list(gen)], dtype=torch.long)
        acts = loaded.activations(seq, hook)
        if intervene:
            acts = fn.apply(acts, offset=0)
        out.append(fire_summary(sae, acts[0, P:], loaded.token_strs(gen)))
    return out
