"""The model's own forward pass beside TransformerLens's bridge, for reading one hook fast.

TransformerBridge replaces every Hugging Face submodule with a bridge component that carries
hook points, and loads attention as `eager` so that attention patterns can be hooked. Each
forward pass through it pays host time in every component (on a GPU the harvest is bound by
it: a forward of 64 contexts costs about as much host time as one of 256), and eager
attention writes each [heads, T, T] pattern to memory. Reading one hook's activations needs
none of that.

`DirectForward` builds a second module tree from the bridge's `original_component`s: the
same parameter and buffer tensors (no copy of the weights), plain Hugging Face modules, and
attention by PyTorch's `scaled_dot_product_attention` where the model supports it. A hook is
read there as a PyTorch forward hook (a pre-hook for the bridge's `hook_in`) on the module
whose output the bridge's `hook_out` sees, and the pass stops at it, as
`LoadedModel.activations` does on the bridge. The bridge stays the reference:
`LoadedModel.activations` uses this path for a hook only after it matched the bridge on the
first batch it read (`agrees`), and falls back to the bridge otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from torch import Tensor, nn

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.08, torch.float16: 0.02}
"""The largest median per-token relative difference ‖direct − bridge‖ / ‖bridge‖ accepted on
the first batch. Measured on SmolLM2-135M (8 random contexts of 128 tokens; the attention
kernel, SDPA instead of eager, is the only difference): below 1e-6 in float32; in bfloat16
1.3–2.5 % at layer 15 and 29's residual stream and MLP output — as far as the bridge's own
bfloat16 activations are from its float32 ones (1.2–2.5 %), while adjacent layers' residual
streams differ by 25–80 %."""


class _Stop(Exception):
    """Raised by the capturing hook to end the forward pass there."""


def _own_state(module: nn.Module) -> None:
    """Give a shallow copy hook dictionaries of its own, empty (a shared one would let a hook
    registered on the copy fire on the original too; the copy runs no hook it did not get
    itself), and a buffer dictionary of its own holding the same tensors (state a module
    re-registers as it runs, such as dynamic RoPE's frequencies, then stays in the copy)."""
    for key, value in list(vars(module).items()):
        if key.startswith("_") and "hooks" in key and isinstance(value, dict):
            setattr(module, key, type(value)())
    module._buffers = type(module._buffers)(module._buffers)


class DirectForward:
    """A Hugging Face module tree that shares the bridge's weights; see the module docstring."""

    def __init__(self, bridge, root: nn.Module):
        self.bridge = bridge
        # a deep copy: setting the attention recurses into sub-configs, which must stay the
        # bridge's (modules holding a sub-config keep the original: they run as the bridge's)
        self.config = copy.deepcopy(root.config)
        if getattr(root, "_supports_sdpa", False):
            self.config._attn_implementation = "sdpa"
        self.attention = self.config._attn_implementation
        """The attention kernel this tree runs: sdpa where the model supports it."""
        self._memo: dict[int, nn.Module] = {}
        self._original_config = root.config
        self.root = self._unwrap(root)
        self._targets: dict[str, tuple[nn.Module, str] | None] = {}
        self._forward_args = set(inspect.signature(root.forward).parameters)
        first = next(root.parameters(), None)
        self.placed = None if first is None else (first.device, first.dtype)
        """Where the weights were when the copy was made (a moved model needs a new copy: its
        buffers are the copy's own)."""

    @classmethod
    def of(cls, bridge) -> DirectForward | None:
        """The direct path of a TransformerBridge, or None where it cannot be built: no Hugging
        Face model inside, or modules whose `forward` was replaced on the instance (accelerate's
        device-map dispatch does that; a copy would still call the original's)."""
        root = getattr(bridge, "original_model", None)
        if not isinstance(root, nn.Module) or not hasattr(getattr(root, "config", None),
                                                           "_attn_implementation"):
            return None
        if any("forward" in vars(m) for m in root.modules()):
            return None
        try:
            return cls(bridge, root)
        except Exception:  # noqa: BLE001 - an optimisation that cannot be built: the bridge
            return None

    def _unwrap(self, module: nn.Module) -> nn.Module:
        """The copy of `module` with every bridge component replaced by (the copy of) the
        module it wraps; parameters and buffers are the same tensors (`_own_state`)."""
        key = id(module)
        if key in self._memo:
            return self._memo[key]
        original = getattr(module, "original_component", None)
        if isinstance(original, nn.Module) and original is not module:
            out = self._unwrap(original)
            self._memo[key] = out  # the bridge component maps to its module's copy
            return out
        new = copy.copy(module)
        self._memo[key] = new
        new._modules = type(module._modules)(
            (name, None if child is None else self._unwrap(child))
            for name, child in module._modules.items()
        )
        _own_state(new)
        if getattr(new, "config", None) is self._original_config:
            new.config = self.config
        return new

    def target(self, hook: str) -> tuple[nn.Module, str] | None:
        """(module, "in" | "out") whose input or output the bridge's hook `hook` sees, or None
        where the hook is not a bridge component's `hook_in` / `hook_out`."""
        if hook not in self._targets:
            self._targets[hook] = self._find(self.bridge.hook_dict.get(hook))
        return self._targets[hook]

    def _find(self, point) -> tuple[nn.Module, str] | None:
        """The copy of the bridge component whose `hook_in` / `hook_out` is `point`, and which."""
        if point is None:
            return None
        for component in self.bridge.modules():
            if id(component) not in self._memo or getattr(component, "original_component", None) is None:
                continue
            for side in ("in", "out"):
                if component._modules.get(f"hook_{side}") is point:
                    return self._memo[id(component)], side
        return None

    @torch.no_grad()
    def capture(self, tokens: Tensor, target: tuple[nn.Module, str]) -> Tensor | None:
        """[B, T] → the activations at `target`, [B, T, d]; nothing after it runs. None when the
        pass never reached it or it is not one tensor."""
        got: list = []

        def stop(act) -> None:
            got.append(act)
            raise _Stop

        with self.replacing(target, stop), contextlib.suppress(_Stop):
            self.root(input_ids=tokens, use_cache=False)
        return got[0] if got and isinstance(got[0], Tensor) else None

    @torch.no_grad()
    def logits(self, tokens: Tensor, target: tuple[nn.Module, str] | None = None,
               replace=None) -> Tensor | None:
        """[B, T] → [B, T, vocab] (None when the model returns none); with `target`,
        `replace(act) -> act` substituted for the activation there (the hook is removed
        afterwards, also when `replace` raises)."""
        with self.replacing(target, replace):
            out = getattr(self.root(input_ids=tokens, use_cache=False), "logits", None)
        return out if isinstance(out, Tensor) else None

    @contextlib.contextmanager
    def replacing(self, target: tuple[nn.Module, str] | None, fn):
        """`with direct.replacing(target, fn):` — fn replaces the activation at `target` in
        every pass inside (nothing without a target); removed on exit, also on exception."""
        handle = _hook_at(*target, fn) if target is not None else None
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def step(self, tokens: Tensor, cache=None) -> tuple[Tensor, object]:
        """One step of cached generation: the logits of the last position [B, 1, vocab] and the
        KV cache after `tokens` (the prompt with no cache, then one new token a step)."""
        kwargs = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_args else {}
        # the cache's name: `cache` in recent transformers, `past_key_values` before
        name = "cache" if "cache" in self._forward_args else "past_key_values"
        out = self.root(input_ids=tokens, use_cache=True, **{name: cache}, **kwargs)
        return out.logits[:, -1:], getattr(out, name)

    def _block_copies(self) -> list[nn.Module] | None:
        """The copies of the bridge's blocks in order, or None where any is missing."""
        blocks = getattr(self.bridge, "blocks", None)
        if blocks is None:
            return None
        copies = [self._memo.get(id(b)) for b in blocks]
        return None if any(c is None for c in copies) else copies

    def _resume_parts(self, target: tuple[nn.Module, str]):
        """(block copies, the first block after `target`, final norm, unembedding) where the
        target is a block's input or output and the bridge names those parts; else None."""
        blocks = self._block_copies()
        norm = self._memo.get(id(getattr(self.bridge, "ln_final", None)))
        unembed = self._memo.get(id(getattr(self.bridge, "unembed", None)))
        if blocks is None or norm is None or unembed is None:
            return None
        module, side = target
        found = [j for j, b in enumerate(blocks) if b is module]
        if not found:
            return None
        return blocks, found[0] + (1 if side == "out" else 0), norm, unembed

    def resumable(self, target: tuple[nn.Module, str]) -> bool:
        """Whether `spliced` can resume after `target` (a block's input or output)."""
        return self._resume_parts(target) is not None

    @torch.no_grad()
    def spliced(self, tokens: Tensor, target: tuple[nn.Module, str]):
        """(logits, activation at `target`, resume) from one forward pass, where the target is
        a block's input or output; `resume(act)` runs only the blocks after it (with the
        arguments each received in that pass: masks, positions), the final norm and the
        unembedding. None where the target is not a block's or the pass did not show it.
        The caller checks once that `resume(activation)` gives the logits (a model might do
        more after its last block than norm and unembed)."""
        parts = self._resume_parts(target)
        if parts is None:
            return None
        blocks, start, norm, unembed = parts
        calls: dict[int, tuple[tuple, dict]] = {}
        got: list = []

        def keep_call(j):
            def pre(mod, args, kwargs) -> None:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"} if not args else kwargs
                calls.setdefault(j, (args[1:], rest))
            return pre

        handles = [blocks[j].register_forward_pre_hook(keep_call(j), with_kwargs=True)
                   for j in range(start, len(blocks))]
        handles.append(_hook_at(*target, got.append))  # returns None: changes nothing
        try:
            logits = getattr(self.root(input_ids=tokens, use_cache=False), "logits", None)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(logits, Tensor) or not got or not isinstance(got[0], Tensor) \
                or len(calls) != len(blocks) - start:
            return None

        def resume(act: Tensor) -> Tensor:
            h = act.clone()  # the caller's activation stays as it is, whatever a block does
            for j in range(start, len(blocks)):
                args, kwargs = calls[j]
                h = _first(blocks[j](h, *args, **kwargs))
            return unembed(norm(h))

        return logits, got[0], resume


def _first(output):
    """A module's main output: the first element of a tuple, else the output itself."""
    return output[0] if isinstance(output, tuple) else output


def _hook_at(module: nn.Module, side: str, fn):
    """A hook on `module` that calls `fn` on its output (side "out") or input ("in"); a tensor
    `fn` returns replaces it, None changes nothing (as in TransformerLens)."""
    if side == "out":
        def on_output(mod, args, output):
            new = fn(_first(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return module.register_forward_hook(on_output)

    def on_input(mod, args, kwargs):
        new = fn(_input(args, kwargs))
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


def _input(args: tuple, kwargs: dict):
    """A block's input hidden states, passed positionally or by name."""
    return args[0] if args else kwargs.get("hidden_states")


def agrees(direct: Tensor, reference: Tensor) -> tuple[bool, float]:
    """Whether the direct path's activations [..., d] match the bridge's: same shape and
    dtype, all finite, the median over tokens of ‖direct − bridge‖ / ‖bridge‖ within
    `TOLERANCE` (a median, because a few tokens carry most of a residual stream's norm) and its
    90th percentile within 4× that; and that median (inf for another shape or dtype)."""
    if direct.shape != reference.shape or direct.dtype != reference.dtype:
        return False, float("inf")
    if not bool(torch.isfinite(direct).all()):
        return False, float("inf")
    ref = reference.float().reshape(-1, reference.shape[-1])
    diff = torch.linalg.vector_norm(direct.float().reshape(ref.shape) - ref, dim=1)
    scale = torch.linalg.vector_norm(ref, dim=1)
    keep = scale > 0
    if not bool(keep.any()):  # an all-zero reference: only zeros agree
        same = bool((diff == 0).all())
        return same, 0.0 if same else float("inf")
    per_token = diff[keep] / scale[keep]
    rel = float(per_token.median())
    tol = TOLERANCE.get(reference.dtype, 1e-4)
    # and no more than a tenth of the tokens beyond 4× the tolerance
    return rel <= tol and float(per_token.quantile(0.9)) <= 4 * tol, rel
