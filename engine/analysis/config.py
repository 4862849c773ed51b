"""What the analysis pass reads and keeps (`moesae analyze` flags, `moesae build` keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime import RuntimeConfig


@dataclass
class AnalysisConfig:
    """How much the one-pass analysis reads, and how much of what it finds it stores."""

    analysis_contexts: int = field(default=2000, metadata={"aliases": ("--contexts",)})
    """Harvested contexts the analysis pass reads (top examples, densities, routing come from these; 0 = all). Their activations are on disk, so each costs only the SAEs' encode."""
    analysis_split: str = field(default="all", metadata={"choices": ("all", "eval")})
    """Which harvested contexts: all (training and held-out) or eval (held-out only)."""
    top_examples: int = 20
    """Top-activating examples kept per feature."""
    bands: int = 10
    """Quantile bands per feature (band b holds activations in [b, b+1)·max/bands)."""
    per_band: int = 5
    """Examples sampled per band."""
    hist_bins: int = 48
    """Log-spaced activation histogram bins per feature."""
    neighbours: int = 10
    """Nearest features by decoder cosine kept per feature."""
    dup_threshold: float = 0.7
    """Duplicate pairs are stored down to this decoder cosine (the lowest τ of METHOD §4)."""
    max_pairs: int = 200_000
    """At most this many duplicate pairs per SAE (the most similar)."""
    min_pairs: int = 500
    """The most similar pairs kept whatever their cosine, so the duplicate browser always has pairs to show."""
    compare: bool = True
    """Match the features of every two SAEs of the build by decoder cosine (the Compare page)."""
    logit_tokens: int = 10
    """Promoted and suppressed output tokens kept per feature."""
    umap: bool = True
    """Feature map by UMAP (cosine); --no-umap uses PCA (fast, for tests)."""
    clusters: int | None = 0
    """Spherical k-means clusters of decoder directions: 0 = √(M/2), none = no clustering."""
    analysis_seed: int = 0
    """Seed for the map, the clusters and the band samples."""
    chunk_tokens: int = 4096
    """Tokens encoded per chunk by every SAE."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision of the SAEs' encode (--device, --precision)."""
