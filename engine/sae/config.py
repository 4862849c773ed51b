"""The architecture of one SAE (METHOD.md §1–3): what a checkpoint's cfg.json records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import ConfigError
from . import registry

WEIGHTINGS = ("softmax", "binary")
SCALING_FORMS = ("t_mean", "plain_mean")


@dataclass
class SAEConfig:
    """Architecture of one SAE. Defaults are the recommended values for the offline demo."""

    arch: str = "scale"
    """topk (dense, METHOD §1), switch (top-1 routing, §2) or scale (§3)."""
    d_in: int = field(default=576, metadata={"derived": True})
    """Width of the activations the SAE reads (the model's d_model at the hook)."""
    width: int = 4608
    """M, total features."""
    experts: int = 16
    """N, experts (ignored by topk)."""
    active: int = 2
    """e, experts per token (scale only)."""
    k: int = 32
    """Global TopK."""
    feature_scaling: bool = True
    """Scale only: learnable T and ω (METHOD §3); --no-feature-scaling for the ablation."""
    expert_weighting: str = "softmax"
    """softmax: Scale weights its experts by a softmax over the selected probabilities and Switch by p_{i*}; binary: weight 1 (the ablation; the reference codes' heaviside)."""
    scaling_form: str = field(default="t_mean", metadata={"choices": SCALING_FORMS})
    """Feature Scaling's high-frequency part: t_mean, H_i = W_i − T·mean (METHOD §3, the authors' code), or plain_mean, W_i − mean (checkpoints saved before 2026-11-25 load with it)."""

    @property
    def expert_width(self) -> int:
        """m = M / N features per expert."""
        return self.width // self.experts

    def normalised(self) -> SAEConfig:
        """The configuration the SAE is built with: a dense SAE has one expert, a Switch SAE
        one active expert. (What a user asked for, e.g. `--experts 16` with `--arch topk`, is
        kept as asked in training configs, so it names the same run.)"""
        spec = registry.get(self.arch)
        if not spec.routed:
            return replace(self, experts=1, active=1)
        if spec.max_active is not None:
            return replace(self, active=min(self.active, spec.max_active))
        return replace(self)

    def validate(self) -> SAEConfig:
        registry.get(self.arch)  # unknown names fail with the list of known ones
        if self.scaling_form not in SCALING_FORMS:
            raise ConfigError(
                f"Unknown scaling form '{self.scaling_form}'; choose {' or '.join(SCALING_FORMS)}."
            )
        if self.expert_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"Unknown expert weighting '{self.expert_weighting}'; choose softmax or binary."
            )
        for name in ("d_in", "width", "experts", "active", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer.")
        if self.width % self.experts:
            raise ConfigError(
                f"The width ({self.width}) must be divisible by the number of experts ({self.experts})."
            )
        if self.active > self.experts:
            raise ConfigError(f"--active ({self.active}) cannot exceed --experts ({self.experts}).")
        per_set = self.active * self.expert_width
        if self.k > per_set:
            raise ConfigError(
                f"--k ({self.k}) exceeds the {per_set} features available to a token "
                f"({self.active} active expert(s) × {self.expert_width} features each)."
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        """From a checkpoint's cfg.json. One saved before Feature Scaling's form was recorded
        (2026-11-25) used the plain mean, and keeps it, so it gives the outputs it gave."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("scaling_form", "plain_mean")
        return cls(**d)
