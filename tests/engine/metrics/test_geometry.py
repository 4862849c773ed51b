"""The one geometry pass over a decoder (METHOD.md §4): max cosines per expert, redundancy,
expert similarity, neighbours and duplicate pairs, against hand-built cases and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.metrics.geometry import (
    decoder_geometry,
    expert_similarity,
    max_cosine,
    redundancy_ratio,
)


def brute_per_expert(W: torch.Tensor, groups: torch.Tensor, N: int) -> torch.Tensor:
    Wn = W / W.norm(dim=1, keepdim=True)
    S = Wn @ Wn.T
    S.fill_diagonal_(-math.inf)
    return torch.stack([S[:, groups == j].amax(1) for j in range(N)], 1)


def test_planted_duplicates_give_exact_redundancy_ratios():
    # 8 orthogonal directions; rows 0/1 duplicates (cos 1), row 2 at cos 0.85 to e0, row 3 at 0.75.
    d = 8
    W = torch.eye(d)
    W[1] = W[0] * 3.0  # same direction, different norm
    W[2] = 0.85 * torch.eye(d)[0] + math.sqrt(1 - 0.85**2) * torch.eye(d)[2]
    W[3] = 0.75 * torch.eye(d)[0] + math.sqrt(1 - 0.75**2) * torch.eye(d)[3]
    mc = max_cosine(decoder_geometry(W)).overall
    expected = torch.tensor([1, 1, 0.85, 0.75, 0, 0, 0, 0], dtype=torch.float32)
    assert torch.allclose(mc, expected, atol=1e-6)
    assert redundancy_ratio(mc, 0.9) == pytest.approx(2 / 8)
    assert redundancy_ratio(mc, 0.8) == pytest.approx(3 / 8)
    assert redundancy_ratio(mc, 0.7) == pytest.approx(4 / 8)


def test_within_and_across_labels():
    # Experts {0,1} and {2,3}: rows 0 and 1 duplicate inside expert 0; row 2 duplicates row 0
    # across experts; row 3 is orthogonal to everything.
    e = torch.eye(4)
    W = torch.stack([e[0], e[0], e[0], e[3]])
    groups = torch.tensor([0, 0, 1, 1])
    mc = max_cosine(decoder_geometry(W, groups))
    assert mc.within.tolist() == pytest.approx([1, 1, 0, 0])
    assert mc.across.tolist() == pytest.approx([1, 1, 1, 0])
    assert redundancy_ratio(mc.within, 0.9) == 0.5
    assert redundancy_ratio(mc.across, 0.9) == 0.75
    assert redundancy_ratio(mc.overall, 0.9) == 0.75


def test_expert_similarity_hand_built():
    # Expert 0: e0, e1. Expert 1: e0, (e1+e2)/√2. Expert 2: a single feature e3.
    e = torch.eye(4)
    r = 1 / math.sqrt(2)
    W = torch.stack([e[0], e[1], e[0], r * (e[1] + e[2]), e[3]])
    fe = torch.tensor([0, 0, 1, 1, 2])
    S = expert_similarity(decoder_geometry(W, fe, 3))
    # [0,0]: e0↔e1 = 0 both ways → 0.  [0,1]: e0 → 1, e1 → r → (1 + r)/2.  [0,2]: 0.
    # [1,0]: e0 → 1, (e1+e2)/√2 → r → (1 + r)/2.  [1,1]: cos(e0, (e1+e2)/√2) = 0 → 0.
    # [2,2]: a lone feature has no partner → NaN.  [2, j]: 0.
    expected = torch.tensor(
        [[0, (1 + r) / 2, 0], [(1 + r) / 2, 0, 0], [0, 0, math.nan]], dtype=torch.float32
    )
    assert torch.allclose(S, expected, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("block", [1, 7, 64, None])
def test_blocked_equals_brute_force(block, contiguous):
    g = torch.Generator().manual_seed(0)
    M, d, N = 48, 6, 4
    W = torch.randn(M, d, generator=g)
    W[5] = W[30] * 2  # a planted cross-expert duplicate
    groups = torch.arange(M) // (M // N) if contiguous else torch.randint(0, N, (M,), generator=g)
    got = decoder_geometry(W, groups, N, block=block).per_expert
    ref = brute_per_expert(W, groups, N)
    assert torch.allclose(got, ref, atol=1e-5)
    mc = max_cosine(decoder_geometry(W, groups, N, block=block))
    assert torch.allclose(mc.overall, ref.amax(1), atol=1e-5)
    assert mc.overall[5] == pytest.approx(1.0, abs=1e-6)



def test_neighbours_pairs_and_expert_similarity_match_brute_force():
    g = torch.Generator().manual_seed(0)
    M, d, N = 40, 8, 4
    W = torch.randn(M, d, generator=g)
    W[5] = W[3] + 0.01 * torch.randn(d, generator=g)  # a duplicate within expert 0
    W[30] = -W[1]
    W[31] = W[2] * 3  # duplicate across experts, different norm
    expert_of = torch.arange(M) // (M // N)
    geo = decoder_geometry(W, expert_of, N, neighbours=5, pair_threshold=0.5, block=7)
    Wn = (W / W.norm(dim=1, keepdim=True)).numpy()
    C = Wn @ Wn.T
    np.fill_diagonal(C, -np.inf)
    for f in range(M):
        order = np.argsort(-C[f], kind="stable")[:5]
        np.testing.assert_allclose(geo.nbr_cos[f].numpy(), C[f, order], atol=1e-5)
        assert max_cosine(geo).overall[f] == pytest.approx(C[f].max(), abs=1e-5)
    a, b, c = geo.pairs
    brute = {(i, j) for i in range(M) for j in range(i + 1, M) if C[i, j] >= 0.5}
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == brute
    assert (3, 5) in brute and (2, 31) in brute
    assert torch.all(c[:-1] >= c[1:])
    sim = expert_similarity(geo)
    ex = expert_of.numpy()
    for i in range(N):
        for j in range(N):
            want = np.mean([C[f][ex == j].max() for f in np.nonzero(ex == i)[0]])
            assert sim[i, j] == pytest.approx(want, abs=1e-5)


def test_duplicate_pairs_are_capped():
    W = torch.ones(30, 4) + 0.001 * torch.randn(30, 4)
    geo = decoder_geometry(W, None, None, neighbours=3, pair_threshold=0.5, block=4, max_pairs=20)
    assert len(geo.pairs[0]) == 20


def test_the_most_similar_pairs_are_kept_whatever_their_cosine():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 32, generator=g)  # random directions: no pair near 0.7
    geo = decoder_geometry(W, None, None, pair_threshold=0.7, min_pairs=5, block=7)
    a, b, c = geo.pairs
    Wn = W / W.norm(dim=1, keepdim=True)
    C = Wn @ Wn.T
    iu = torch.triu_indices(40, 40, 1)
    best = C[iu[0], iu[1]].topk(5).values
    assert float(c.max()) < 0.7 and len(c) == 5
    assert torch.allclose(c, best, atol=1e-6)
    assert all(int(x) < int(y) for x, y in zip(a, b, strict=True))
    none = decoder_geometry(W, None, None, pair_threshold=0.7, block=7)
    assert len(none.pairs[0]) == 0
