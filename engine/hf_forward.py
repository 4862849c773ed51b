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

import copy

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


def _fresh_hooks(module: nn.Module) -> None:
    """Give a shallow copy its own hook dictionaries (shared ones would let a hook registered on
    the copy fire on the original as well), keeping the hooks it had."""
    for key, value in list(vars(module).items()):
        if key.startswith("_") and "hooks" in key and isinstance(value, dict):
            setattr(module, key, type(value)(value))


class DirectForward:
    """A Hugging Face module tree that shares the bridge's weights; see the module docstring."""

    def __init__(self, bridge, root: nn.Module):
        self.bridge = bridge
        self.config = copy.copy(root.config)
        if getattr(root, "_supports_sdpa", False):
            self.config._attn_implementation = "sdpa"
        self.attention = self.config._attn_implementation
        """The attention kernel this tree runs: sdpa where the model supports it."""
        self._memo: dict[int, nn.Module] = {}
        self._original_config = root.config
        self.root = self._unwrap(root)
        self._targets: dict[str, tuple[nn.Module, str] | None] = {}

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
        return cls(bridge, root)

    def _unwrap(self, module: nn.Module) -> nn.Module:
        """The copy of `module` with every bridge component replaced by (the copy of) the
        module it wraps; parameters and buffers are the same tensors."""
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
        _fresh_hooks(new)
        if getattr(new, "config", None) is self._original_config:
            new.config = self.config
        return new

    def target(self, hook: str) -> tuple[nn.Module, str] | None:
        """(module, "in" | "out") whose input or output the bridge's hook `hook` sees, or None
        where the hook is not a bridge component's `hook_in` / `hook_out`."""
        if hook not in self._targets:
            point = self.bridge.hook_dict.get(hook)
            found = None
            for component in self.bridge.modules():
                if point is None or getattr(component, "original_component", None) is None:
                    continue
                for side in ("in", "out"):
                    if component._modules.get(f"hook_{side}") is point and id(component) in self._memo:
                        found = (self._memo[id(component)], side)
                        break
                if found:
                    break
            self._targets[hook] = found
        return self._targets[hook]

    @torch.no_grad()
    def capture(self, tokens: Tensor, target: tuple[nn.Module, str]) -> Tensor | None:
        """[B, T] → the activations at `target`, [B, T, d]; nothing after it runs. None when the
        pass never reached it or it is not one tensor."""
        module, side = target
        got: list = []

        def on_output(mod, args, output) -> None:
            got.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        def on_input(mod, args, kwargs) -> None:
            got.append(args[0] if args else kwargs.get("hidden_states"))
            raise _Stop

        if side == "out":
            handle = module.register_forward_hook(on_output)
        else:
            handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
        try:
            self.root(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return got[0] if got and isinstance(got[0], Tensor) else None

    @torch.no_grad()
    def logits(self, tokens: Tensor, target: tuple[nn.Module, str] | None = None,
               replace=None) -> Tensor | None:
        """[B, T] → [B, T, vocab] (None when the model returns none); with `target`,
        `replace(act) -> act` substituted for the activation there (the hook is removed
        afterwards, also when `replace` raises)."""
        handle = _replacing_hook(*target, replace) if target is not None else None
        try:
            out = getattr(self.root(input_ids=tokens, use_cache=False), "logits", None)
            return out if isinstance(out, Tensor) else None
        finally:
            if handle is not None:
                handle.remove()


def _replacing_hook(module: nn.Module, side: str, fn):
    """A hook on `module` that replaces its output (side "out") or input ("in") by `fn(it)`."""
    if side == "out":
        def on_output(mod, args, output):
            return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)

        return module.register_forward_hook(on_output)

    def on_input(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


def agrees(direct: Tensor, reference: Tensor) -> tuple[bool, float]:
    """Whether the direct path's activations [..., d] match the bridge's: same shape and
    dtype, all finite, and the median over tokens of ‖direct − bridge‖ / ‖bridge‖ within
    `TOLERANCE` (a median, because a few tokens carry most of a residual stream's norm); and
    that median."""
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
    rel = float((diff[keep] / scale[keep]).median())
    return rel <= TOLERANCE.get(reference.dtype, 1e-4), rel
