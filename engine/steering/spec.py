"""What to steer: one request (features and strengths, mode, positions, expert
interventions, sampling) and the slider stops the explorer offers for a feature."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

MODES = ("add", "clamp", "scale")
POSITIONS = ("all", "generated")
MAX_NEW_TOKENS = 512

@dataclass
class SteerSpec:
    """One steering request: which features/experts to change, how, and how to sample."""

    features: list[tuple[int, float]] = field(default_factory=list)
    """(feature, strength) pairs; strength is in the SAE's activation units (as max_act)."""
    mode: str = "add"
    """add (strength × decoder row), clamp (set the feature's code to strength) or scale (multiply it by strength)."""
    positions: str = "all"
    """all, or generated (the last prompt position and every generated one)."""
    ablate_expert: int | None = field(default=None, metadata={"metavar": "E"})
    """MoE SAEs: remove every feature of this expert from the code (error term kept; default: none)."""
    force_expert: int | None = field(default=None, metadata={"metavar": "E"})
    """MoE SAEs: route every token to this expert alone (error term kept; default: none)."""
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
