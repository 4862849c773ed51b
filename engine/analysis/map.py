"""Where features sit relative to each other: a 2-D map of the decoder directions and
spherical k-means clusters (both by cosine, both seeded)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def map_coordinates(W_dec: Tensor, use_umap: bool = True, seed: int = 0, n_epochs: int | None = None) -> tuple[np.ndarray, str]:
    """2-D coordinates of the decoder directions: UMAP (cosine) or PCA for tiny SAEs / umap=False."""
    W = W_dec.detach().float()
    W = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    M = W.shape[0]
    if use_umap and M >= 20:
        import umap  # heavy import (numba): only when used

        n_neighbors = min(15, M - 1)
        reducer = umap.UMAP(
            n_components=2, metric="cosine", n_neighbors=n_neighbors, min_dist=0.1,
            random_state=seed, n_epochs=n_epochs or (200 if M <= 10_000 else 100), low_memory=True,
        )
        return reducer.fit_transform(W).astype(np.float32), "umap"
    if M < 2:
        return np.zeros((M, 2), np.float32), "pca"
    Wc = W - W.mean(0)
    _, _, Vt = np.linalg.svd(Wc, full_matrices=False)
    xy = Wc @ Vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy.astype(np.float32), "pca"


@torch.no_grad()
def spherical_kmeans(W_dec: Tensor, n_clusters: int, seed: int = 0, iters: int = 20) -> np.ndarray:
    """Cluster decoder directions by cosine (k-means on the unit sphere); labels [M]."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    M = W.shape[0]
    n_clusters = max(1, min(n_clusters, M))
    g = torch.Generator().manual_seed(seed)
    C = W[torch.randperm(M, generator=g)[:n_clusters]].clone()
    labels = torch.zeros(M, dtype=torch.long)
    for _ in range(iters):
        labels = torch.cat([(W[s : s + 4096] @ C.T).argmax(1) for s in range(0, M, 4096)])
        new = torch.zeros_like(C).index_add_(0, labels, W)
        norms = new.norm(dim=1, keepdim=True)
        C = torch.where(norms > 0, new / norms.clamp_min(1e-12), C)
    return labels.numpy().astype(np.int32)
