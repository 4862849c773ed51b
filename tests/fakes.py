"""Fakes that follow the engine's contracts (docs/CONTRACTS.md), shared by the tests: an
activation store with an eval split, and a language model small enough to compute by hand."""

from __future__ import annotations

import numpy as np
import torch


class FakeTokenSet:
    """One split: raw activations with their (context, position); records how it was read."""

    def __init__(self, x: np.ndarray, context_ids: np.ndarray | None = None,
                 positions: np.ndarray | None = None):
        self.x = np.asarray(x, dtype=np.float32)
        self.n_tokens = len(self.x)
        self.context_ids = np.zeros(len(x), np.int64) if context_ids is None else context_ids
        self.positions = np.arange(len(x)) if positions is None else positions
        self.chunk_sizes: list[int] = []

    def read(self, idx: np.ndarray) -> np.ndarray:
        return self.x[idx]

    def iter_chunks(self, n: int):
        for start in range(0, self.n_tokens, n):
            self.chunk_sizes.append(len(self.x[start : start + n]))
            yield start, self.x[start : start + n]


class FakeActs:
    """An ActivationStore: contexts (tokens, domains, split) and an eval split."""

    model_name, hook, path, norm_scale = "fake", "blocks.0.hook_resid_post", "fake", 1.0

    def __init__(self, eval_set: FakeTokenSet, tokens: np.ndarray | None = None,
                 domains: list[str] | None = None, split: list[str] | None = None):
        self.eval_set = eval_set
        self.d_in = eval_set.x.shape[1]
        self.tokens = np.zeros((0, 4), np.int32) if tokens is None else tokens
        self.domains = domains if domains is not None else ["test"] * len(self.tokens)
        self.splits = split if split is not None else []

    @classmethod
    def of(cls, x_eval: np.ndarray, tokens=None, split=None) -> FakeActs:
        """Held-out activations `x_eval` (and, for CE, the contexts they came from)."""
        return cls(FakeTokenSet(x_eval), tokens, None, split)

    @classmethod
    def random(cls, n_ctx=12, L=8, d=16, vocab=40, seed=0, drop=((3, 0),)) -> FakeActs:
        """Contexts 0–1 train, the rest eval; eval tokens stored shuffled, some positions dropped."""
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, vocab, (n_ctx, L)).astype(np.int32)
        domains = ["pydoc" if c % 3 else "bible" for c in range(n_ctx)]
        split = ["train" if c < 2 else "eval" for c in range(n_ctx)]
        cc, pp = np.meshgrid(np.arange(2, n_ctx), np.arange(L), indexing="ij")
        keep = np.ones(cc.shape, bool)
        for c, p in drop:
            keep[c - 2, p] = False
        cc, pp = cc[keep], pp[keep]
        perm = rng.permutation(len(cc))
        x = rng.standard_normal((len(cc), d)).astype(np.float32) * 3
        return cls(FakeTokenSet(x, cc[perm], pp[perm]), tokens, domains, split)

    def contexts(self):
        return self.tokens, self.domains, self.splits

    def split(self, name: str) -> FakeTokenSet:
        if name == "train":  # the fakes hold held-out tokens only
            return FakeTokenSet(np.zeros((0, self.d_in), np.float32), np.zeros(0, np.int64),
                                np.zeros(0, np.int64))
        assert name == "eval"
        return self.eval_set


class FakeLM:
    """A LoadedModel whose hook activation is E[token] and whose logits are
    U · tanh(activation) + a bias that depends on the previous token, so CE can be computed by
    hand; W_U = U for logit effects; token strings ' t<i>' (and "it's" for id 7)."""

    name, n_layers, has_lm_head = "fake", 1, True
    device = torch.device("cpu")

    def __init__(self, vocab: int = 40, d: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d_model = d
        self.E = torch.randn(vocab, d, generator=g)
        self.U = torch.randn(d, vocab, generator=g)
        self.P = torch.randn(vocab, vocab, generator=g)
        self.calls: list[str] = []

    def _run(self, tokens, fn=None):
        act = self.E[tokens]
        if fn is not None:
            act = fn(act)
        prev = torch.cat([tokens[:, :1], tokens[:, :-1]], 1)
        return torch.tanh(act) @ self.U + self.P[prev]

    def logits(self, tokens):
        self.calls.append("orig")
        return self._run(tokens)

    def logits_with_hook(self, tokens, hook, fn):
        assert hook == FakeActs.hook
        self.calls.append("hook")
        return self._run(tokens, fn)

    def spliced(self, tokens, hook):
        assert hook == FakeActs.hook
        self.calls.append("orig")
        act = self.E[tokens]

        def resume(new):
            self.calls.append("resume")
            return self._run(tokens, lambda a: new)

        return self._run(tokens), act, resume

    def token_strs(self, ids):
        return [f" t{i}" if i != 7 else "it's" for i in ids]

    def unembed_matrix(self):
        return self.U

    def final_norm(self, x):
        return x
