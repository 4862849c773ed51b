"""The tokens an analysis reads: the first n held-out contexts, in (context, position) order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError


@dataclass
class AnalysisTokens:
    rows: np.ndarray
    """Row of each analysis token in the eval split of the activation store."""
    chosen: np.ndarray
    """The analysis contexts (ids into the harvest's contexts), ascending."""
    ctx: np.ndarray
    """Context id of each analysis token."""
    pos: np.ndarray
    """Position of each analysis token inside its context."""
    token_id: np.ndarray
    """Vocabulary id of each analysis token."""
    vocab: np.ndarray
    """The distinct vocabulary ids among the analysis tokens (a compact vocabulary)."""
    vocab_index: torch.Tensor
    """Index of each analysis token's id in `vocab`."""
    domain: torch.Tensor
    """Domain index of each analysis token."""
    domain_names: list[str]
    context_tokens: np.ndarray
    """int [len(chosen), L] the token ids of the analysis contexts."""
    context_domains: list[str]
    context_splits: list[str]
    """'train' or 'eval' for each analysis context."""
    reader: object
    """Reads the analysis rows' activations (`SplitsReader`)."""
    strings: dict[int, str] = field(default_factory=dict)
    """Vocabulary id → its text, filled once per distinct id (`decode_strings`)."""

    def read(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop − start, d] raw activations of analysis tokens start … stop − 1."""
        return self.reader.read(self.rows[start:stop])

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def context_len(self) -> int:
        return int(self.context_tokens.shape[1])

    def decode_strings(self, model, more_ids=()) -> None:
        """Fill `strings` for every id of the analysis contexts (and `more_ids`)."""
        need = np.unique(np.concatenate([self.context_tokens.reshape(-1), self.vocab,
                                         np.asarray(list(more_ids), dtype=np.int64)]))
        missing = [int(i) for i in need if int(i) not in self.strings]
        if missing:
            self.strings.update(zip(missing, model.token_strs(missing), strict=True))


class SplitsReader:
    """Rows of several splits of an activation store as one list (the train split's rows
    first: harvests give training contexts the lower ids)."""

    def __init__(self, sets: list):
        self.sets = sets
        self.offsets = np.cumsum([0] + [s.n_tokens for s in sets])
        self.context_ids = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(s.context_ids) for s in sets])
        self.positions = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(s.positions) for s in sets])

    def read(self, rows: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = []
        for i, ts in enumerate(self.sets):
            mine = rows[which == i]
            if len(mine):
                parts.append(np.asarray(ts.read(mine - self.offsets[i]), dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def analysis_tokens(acts, n_contexts: int, split: str = "all") -> AnalysisTokens:
    """The first `n_contexts` (0: all) analysis contexts: every held-out context first, then
    training contexts, in order of id; their tokens sorted by (context, position)."""
    all_tokens, all_domains, all_split = acts.contexts()
    all_tokens = np.asarray(all_tokens)
    names = ("train", "eval") if split == "all" else ("eval",)
    reader = SplitsReader([acts.split(n) for n in names])
    ctx_ids, positions = reader.context_ids, reader.positions
    if len(ctx_ids) == 0:
        raise DataError("The activation store has no tokens to analyse; harvest more tokens.")
    present = np.unique(ctx_ids)
    held = np.array([c for c in present if all_split[c] == "eval"], dtype=np.int64)
    rest = np.array([c for c in present if all_split[c] != "eval"], dtype=np.int64)
    chosen = np.concatenate([held, rest])
    if n_contexts:
        chosen = chosen[:n_contexts]
    chosen = np.sort(chosen)
    rows = np.nonzero(np.isin(ctx_ids, chosen))[0]
    rows = rows[np.lexsort((positions[rows], ctx_ids[rows]))]  # by (context, position)
    tok_ctx = ctx_ids[rows]
    tok_pos = positions[rows]
    tok_id = all_tokens[tok_ctx, tok_pos].astype(np.int64)
    domain_names = sorted({all_domains[c] for c in chosen})
    dom_index = {d: i for i, d in enumerate(domain_names)}
    tok_dom = np.array([dom_index[all_domains[c]] for c in tok_ctx], dtype=np.int64)
    vocab, tok_vocab = np.unique(tok_id, return_inverse=True)
    return AnalysisTokens(
        rows=rows, chosen=chosen, ctx=tok_ctx, pos=tok_pos, token_id=tok_id, vocab=vocab,
        vocab_index=torch.from_numpy(tok_vocab.astype(np.int64)), domain=torch.from_numpy(tok_dom),
        domain_names=domain_names, context_tokens=all_tokens[chosen],
        context_domains=[all_domains[c] for c in chosen],
        context_splits=[all_split[c] for c in chosen], reader=reader,
    )
