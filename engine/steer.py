"""Steering: change what an SAE's features (or a MoE SAE's experts) contribute at the SAE's hook
while the model generates, and compare the continuation with the unsteered one.

Every intervention is a function `act [B, T, d] → act` applied at the hook while the shared
`LoadedModel.generate` runs (registered once around it with `LoadedModel.hooked`, which removes
it afterwards even on error).
Activations at the hook are in the model's units (raw); the SAE works on `x_norm = s · x_raw`
(`sae.input_scale`), so every change made in SAE space is divided by s before it is added.

- `add`:    x' = x + Σ_f strength_f · W_dec[f] / s        (no SAE encode at all)
- `clamp`:  z'_f = value_f;   `scale`: z'_f = factor_f · z_f
- `ablate_expert` E: z'_f = 0 for every feature of expert E
- `force_expert` E: the codes are those of routing every token to E alone (router probabilities
  replaced by a one-hot on E, so its weight is 1; METHOD §2–3 with S = {E}).

Code edits keep the SAE's error term: x' = denorm(decode(z')) + (x − denorm(decode(z))), which is
computed as x + W_decᵀ(z' − z) / s — the same vector (b_dec cancels), exactly x where z' = z, and
only the edited features' decoder rows are touched.

`positions='generated'` steers the last prompt position (it predicts the first new token) and
every generated position; the rest of the prompt is read unsteered.

Results are cached by `spec_key` in `engine.store.SteeringCache`, a sidecar file beside the
build (`<db>.steer.duckdb`), because the explorer holds the build itself read-only and DuckDB
allows one writer per file.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from .models import LoadedModel
    from .sae import SparseAutoencoder
    from .store import SAEInfo, SteeringCache, Store

MODES = ("add", "clamp", "scale")
POSITIONS = ("all", "generated")
MAX_NEW_TOKENS = 512
CACHE_VERSION = 1
"""Bump when the meaning of a cached payload changes, so old entries are never served."""


# ----------------------------------------------------------------------------------------------
# What to do
# ----------------------------------------------------------------------------------------------
@dataclass
class SteerSpec:
    """One steering request: which features/experts to change, how, and how to sample."""

    features: list[tuple[int, float]] = field(default_factory=list)
    """(feature, strength) pairs; strength is in the SAE's activation units (as max_act)."""
    mode: str = "add"
    """add (strength × decoder row), clamp (set the feature's code to strength) or scale (multiply it by strength)."""
    positions: str = "all"
    """all, or generated (the last prompt position and every generated one)."""
    ablate_expert: int | None = None
    """MoE SAEs: remove every feature of this expert from the code (error term kept)."""
    force_expert: int | None = None
    """MoE SAEs: route every token to this expert alone (error term kept)."""
    max_new_tokens: int = 24
    """Tokens to generate."""
    temperature: float = 0.0
    """0 for greedy decoding, else sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = no truncation)."""
    seed: int = 0
    """Sampling seed, shared by the default and the steered run."""

    def __post_init__(self) -> None:
        self.features = [(int(f), float(s)) for f, s in self.features]

    def validate(self, width: int | None = None, experts: int | None = None) -> SteerSpec:
        """ConfigError (one sentence) for anything impossible; `width`/`experts` of the SAE."""
        if self.mode not in MODES:
            raise ConfigError(f"Unknown steering mode '{self.mode}'; choose one of {', '.join(MODES)}.")
        if self.positions not in POSITIONS:
            raise ConfigError(
                f"Unknown positions '{self.positions}'; choose one of {', '.join(POSITIONS)}."
            )
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}.")
        if not self.temperature >= 0:
            raise ConfigError("--temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1].")
        if not self.features and self.ablate_expert is None and self.force_expert is None:
            raise ConfigError(
                "Nothing to steer: give at least one feature with a strength, an expert to "
                "ablate or an expert to force."
            )
        seen: set[int] = set()
        for f, s in self.features:
            if f in seen:
                raise ConfigError(f"Feature {f} is listed twice; give each feature once.")
            seen.add(f)
            if not math.isfinite(s):
                raise ConfigError(f"The strength of feature {f} is not a finite number.")
            if f < 0:
                raise ConfigError(f"Feature {f} is out of range: features are numbered from 0.")
            if width is not None and f >= width:
                raise ConfigError(
                    f"Feature {f} is out of range: this SAE has {width} features (0–{width - 1})."
                )
        if self.ablate_expert is not None and self.force_expert is not None:
            raise ConfigError("Choose either an expert to ablate or one to force, not both.")
        for name, e in (("ablate", self.ablate_expert), ("force", self.force_expert)):
            if e is None or experts is None:
                continue
            if experts <= 1:
                raise ConfigError(
                    f"--{name}-expert needs a MoE SAE (Switch or Scale); this SAE has no experts."
                )
            if not 0 <= e < experts:
                raise ConfigError(
                    f"Expert {e} is out of range: this SAE has {experts} experts (0–{experts - 1})."
                )
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = [[int(f), float(s)] for f, s in self.features]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SteerSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("The prompt is empty; write some text for the model to continue.")
    return prompt


def spec_key(model: str, sae_id: str, prompt: str, spec: SteerSpec) -> str:
    """sha256 of the canonical JSON of everything that determines a result."""
    d = spec.to_dict()
    d["features"] = sorted(d["features"])
    blob = json.dumps(
        {"v": CACHE_VERSION, "model": model, "sae": sae_id, "prompt": prompt, "spec": d},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """A short hash of an SAE's config and weights, so a retrained SAE under the same name (or a
    rebuilt file beside the same sidecar cache) never hits an old cache entry."""
    fp = _FINGERPRINTS.get(sae)
    if fp is None:
        h = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True).encode())
        for name, t in sorted(sae.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        fp = h.hexdigest()[:16]
        _FINGERPRINTS[sae] = fp
    return fp


# ----------------------------------------------------------------------------------------------
# The intervention at the hook
# ----------------------------------------------------------------------------------------------
def forced_codes(sae: SparseAutoencoder, x_norm: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """(top_acts, top_indices) of `x_norm` [n, d] when the router sends every token to `expert`.

    Written here from the SAE's public pieces (folded encoder, b_enc, b_dec, expert_width) so the
    SAE classes stay exactly METHOD §2–3: with a one-hot router, S = {E} and w_E = 1, so
    z = TopK_k( ReLU( Ŵ_E (x − b_dec) + b_enc,E ) ), k capped at the expert's m features.
    """
    N, m = sae.cfg.experts, sae.cfg.expert_width
    W = sae.encoder_weight().view(N, m, -1)[expert]  # Ŵ_E (Feature Scaling folded in)
    b = sae.b_enc.view(N, m)[expert]
    z = F.relu(F.linear(x_norm - sae.b_dec, W, b))
    top_acts, local = z.topk(min(sae.cfg.k, m), dim=-1, sorted=False)
    return top_acts, local + expert * m


class Intervention:
    """The hook function of one SteerSpec: `fn(act [B, T, d]) -> act`.

    `generate` reruns the whole sequence each step (no KV cache), but this also accepts
    one-position calls of a cached loop: it tracks how far the sequence has grown to know the
    absolute position of each row (needed for positions='generated').
    """

    def __init__(self, sae: SparseAutoencoder, spec: SteerSpec, prompt_len: int,
                 skip_bos: bool = False):
        self.sae, self.spec = sae, spec
        self.prompt_len = prompt_len
        # The BOS position (an attention sink the SAE never saw: harvest drops it) stays as is.
        first = 1 if skip_bos else 0
        self.start = first if spec.positions == "all" else max(prompt_len - 1, first)
        W = sae.W_dec.detach()
        scale = sae.input_scale.detach()
        feats = torch.tensor([f for f, _ in spec.features], dtype=torch.long, device=W.device)
        vals = torch.tensor([s for _, s in spec.features], dtype=W.dtype, device=W.device)
        self.feats, self.vals = feats, vals
        self.add_vec: Tensor | None = None
        if spec.mode == "add" and len(feats):
            # Σ_f strength_f · W_dec[f], undone to the model's units
            self.add_vec = (vals[:, None] * W[feats]).sum(0) / scale
        self.edits_codes = (
            (spec.mode in ("clamp", "scale") and len(feats) > 0)
            or spec.ablate_expert is not None
            or spec.force_expert is not None
        )
        self._seen = 0

    # -- pure ------------------------------------------------------------------------------
    @torch.no_grad()
    def code_edit(self, x_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For rows x_raw [n, d]: (z [n, M], z' [n, M], Δx_raw [n, d]) — the SAE code before and
        after the edit, and x' − x = W_decᵀ (z' − z) / s (the error term is kept)."""
        sae, spec = self.sae, self.spec
        x = sae.normalise(x_raw.to(sae.W_dec.dtype))
        codes = sae.encode(x)
        z = sae.dense_codes(codes)
        if spec.force_expert is not None:
            acts, idx = forced_codes(sae, x, spec.force_expert)
            z_new = z.new_zeros(z.shape).scatter_(1, idx, acts)
        else:
            z_new = z.clone()
        if spec.ablate_expert is not None:
            m = sae.cfg.expert_width
            z_new[:, spec.ablate_expert * m : (spec.ablate_expert + 1) * m] = 0
        if len(self.feats):
            if spec.mode == "clamp":
                z_new[:, self.feats] = self.vals
            elif spec.mode == "scale":
                z_new[:, self.feats] = z_new[:, self.feats] * self.vals
        changed = (z_new != z).any(0).nonzero().squeeze(1)
        dz = (z_new - z)[:, changed]
        delta = sae.denormalise(dz @ sae.W_dec.detach()[changed])
        return z, z_new, delta.to(x_raw.dtype)

    @torch.no_grad()
    def apply(self, act: Tensor, offset: int = 0) -> Tensor:
        """act [B, T, d] whose first row is absolute position `offset` → the steered act."""
        first = max(self.start - offset, 0)
        if first >= act.shape[1]:
            return act
        out = act.clone()
        part = out[:, first:]
        if self.edits_codes:
            flat = part.reshape(-1, part.shape[-1])
            _, _, delta = self.code_edit(flat)
            part += delta.reshape(part.shape)
        if self.add_vec is not None:
            part += self.add_vec.to(part.dtype)
        return out

    # -- the hook --------------------------------------------------------------------------
    def __call__(self, act: Tensor) -> Tensor:
        T = act.shape[1]
        if T == 1 and self._seen >= max(self.prompt_len, 1):  # a cached step: one new position
            offset = self._seen
            self._seen += 1
        else:  # the whole sequence again
            offset = 0
            self._seen = T
        return self.apply(act, offset)


# ----------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------
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


# One steering call at a time per model: hooks live on the shared model object, and the explorer
# shares one loaded model between sessions (st.cache_resource).
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(loaded: Any) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(loaded)
        if lock is None:
            lock = _LOCKS[loaded] = threading.Lock()
        return lock


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


def check_compatible(loaded: LoadedModel, sae: SparseAutoencoder, hook: str) -> str:
    if int(sae.cfg.d_in) != int(loaded.d_model):
        raise ModelError(
            f"The SAE reads {sae.cfg.d_in}-dimensional activations but model {loaded.name} has "
            f"d_model={loaded.d_model}."
        )
    if not getattr(loaded, "has_lm_head", True):
        raise ModelError(f"Model {loaded.name} has no language-model head, so it cannot generate.")
    return loaded.resolve_hook(hook)


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
    hook = check_compatible(loaded, sae, hook)
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
    with model_lock(loaded), torch.no_grad():
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


def cached_steer(
    cache: SteeringCache | None, key: str, compute: Callable[[], SteerResult]
) -> SteerResult:
    """The cached result for `key` when there is one, else `compute()` stored under `key`."""
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return SteerResult.from_dict(hit, cached=True)
    result = compute()
    if cache is not None:
        cache.put(key, result.to_dict())
    return result


def strength_options(max_act: float | None, mode: str = "add", per_side: int = 20) -> list[float]:
    """Slider stops for one feature: symmetric around 0, denser near 0 (quadratic spacing),
    reaching 5× the feature's max activation for `add`, 2× for `clamp`, and ±5 for `scale`
    (a factor). Rounded to 3 significant digits; 0 is always a stop."""
    if mode == "scale":
        reach = 5.0
    else:
        base = float(max_act) if max_act and math.isfinite(max_act) and max_act > 0 else 10.0
        reach = base * (5.0 if mode == "add" else 2.0)
    stops = {0.0, 1.0} if mode == "scale" else {0.0}
    for i in range(1, per_side + 1):
        v = float(f"{reach * (i / per_side) ** 2:.3g}")
        stops.update((v, -v))
    return sorted(stops)


# ----------------------------------------------------------------------------------------------
# From a build file: which SAE, its checkpoint, its model
# ----------------------------------------------------------------------------------------------
@dataclass
class SteerTarget:
    """What a build says about one SAE, enough to load it and its model for steering."""

    sae: str
    model: str
    hook: str
    checkpoint: str
    width: int
    experts: int


def sae_target(store: Store, name: str) -> SteerTarget:
    """The steering target of SAE `name` in a build; ConfigError listing the names if unknown."""
    info = store.sae_info(name)
    if info is None:
        names = [s["sae"] for s in store.list_saes()]
        raise ConfigError(
            f"Unknown SAE '{name}' in {store.path.name}; available: {', '.join(names) or 'none'}."
        )
    return target_from_info(info)


def target_from_info(info: SAEInfo) -> SteerTarget:
    """Where the build says the SAE's checkpoint is (`config.checkpoint`, else `run`/final)."""
    cfg = info.config or {}
    ckpt = cfg.get("checkpoint") or (str(Path(cfg["run"]) / "final") if cfg.get("run") else None)
    if not ckpt:
        raise DataError(
            f"The build does not record where SAE '{info.name}' is saved, so it cannot be steered."
        )
    return SteerTarget(
        sae=info.name, model=info.model, hook=info.hook, checkpoint=str(ckpt),
        width=int(info.width), experts=int(info.experts or 1),
    )


def pick_sae(store: Store, name: str | None) -> tuple[SteerTarget, str | None]:
    """The named SAE, or — when no name is given — the build's only MoE SAE (or its only SAE).
    Returns the target and a note saying which was picked (None when it was named)."""
    if name:
        return sae_target(store, name), None
    saes = store.list_saes()
    moe = [s for s in saes if (s.get("experts") or 1) > 1]
    pool = moe if len(moe) == 1 else (saes if len(saes) == 1 else None)
    if pool is None:
        names = ", ".join(s["sae"] for s in (moe or saes)) or "none"
        raise ConfigError(f"{store.path.name} holds several SAEs; choose one with --sae ({names}).")
    chosen = pool[0]["sae"]
    kind = "MoE SAE" if pool is moe else "SAE"
    return sae_target(store, chosen), f"using SAE '{chosen}' (the only {kind} in {store.path.name})"


def load_target_sae(target: SteerTarget) -> SparseAutoencoder:
    from .checkpoint import load_sae

    sae, _ = load_sae(target.checkpoint)
    return sae


# ----------------------------------------------------------------------------------------------
# `moesae steer`
# ----------------------------------------------------------------------------------------------
def add_steer_args(parser: argparse.ArgumentParser) -> None:
    """The `moesae steer` flags; sampling and mode flags come from SteerSpec's fields."""
    from .cli import add_dataclass_args

    parser.add_argument("--db", required=True, help="the build file (.duckdb)")
    parser.add_argument(
        "--sae", help="SAE name in the build (default: the build's only MoE SAE, if it has one)"
    )
    parser.add_argument("--prompt", required=True, help="text for the model to continue")
    parser.add_argument(
        "--feature", type=int, action="append", default=[], metavar="F",
        help="feature to steer (repeat for several; pair each with --strength)",
    )
    parser.add_argument(
        "--strength", type=float, action="append", default=[], metavar="S",
        help="strength of the matching --feature, in the SAE's activation units (compare the "
        "feature's max activation); one value applies to every feature",
    )
    add_dataclass_args(parser, SteerSpec, skip=("features",))
    for action in parser._actions:  # an unset expert means no expert intervention
        if action.dest in ("ablate_expert", "force_expert"):
            action.metavar = "E"
            action.help = (action.help or "").replace("(default: model default)", "(default: none)")
    parser.add_argument("--model", help="load this model instead of the one the build records")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")


def spec_from_args(args: argparse.Namespace) -> SteerSpec:
    feats, strengths = list(args.feature or []), list(args.strength or [])
    if feats and not strengths:
        raise ConfigError("Give a --strength for the steered feature(s).")
    if strengths and not feats:
        raise ConfigError("--strength was given without a --feature to steer.")
    if len(strengths) == 1:
        strengths = strengths * len(feats)
    if len(strengths) != len(feats):
        raise ConfigError(
            f"Got {len(feats)} --feature and {len(strengths)} --strength values; give one strength "
            "per feature (or a single one for all)."
        )
    return SteerSpec(
        features=list(zip(feats, strengths, strict=True)),
        mode=args.mode, positions=args.positions, ablate_expert=args.ablate_expert,
        force_expert=args.force_expert, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )


def one_line(text: str) -> str:
    """Continuations on one line each (scripts read `default:`/`steered:` lines)."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def cmd_steer(args: argparse.Namespace) -> int:
    from .models import load_model
    from .store import SteeringCache, open_db

    spec = spec_from_args(args)
    prompt = check_prompt(args.prompt)
    with open_db(args.db) as store:
        target, note = pick_sae(store, args.sae)
    if note:
        print(note, file=sys.stderr)
    spec.validate(target.width, target.experts)  # fail before loading anything heavy
    sae = load_target_sae(target)
    model_name = args.model or target.model
    cache = None if args.no_cache else SteeringCache(args.db)
    key = spec_key(model_name, f"{target.sae}@{sae_fingerprint(sae)}", prompt, spec)

    def compute() -> SteerResult:
        loaded = load_model(model_name)
        return steer(loaded, sae, target.hook, prompt, spec)

    result = cached_steer(cache, key, compute)
    if args.json:
        print(json.dumps({**result.to_dict(), "cached": result.cached, "sae": target.sae}))
        return 0
    print(f"default: {one_line(result.default_text)}")
    print(f"steered: {one_line(result.steered_text)}")
    where = "identical" if result.first_diff is None else f"first differ at new token {result.first_diff}"
    print(f"({where}{'; from cache' if result.cached else ''})", file=sys.stderr)
    return 0
