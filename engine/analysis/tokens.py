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
    strings: dict[int, str] = field(default_factory=dict)
    """Vocabulary id → its text, filled once per distinct id (`decode_strings`)."""

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


def analysis_tokens(acts, n_contexts: int) -> AnalysisTokens:
    all_tokens, all_domains, _split = acts.contexts()
    all_tokens = np.asarray(all_tokens)
    ev = acts.split("eval")
    ctx_ids = np.asarray(ev.context_ids)
    positions = np.asarray(ev.positions)
    if len(ctx_ids) == 0:
        raise DataError("The activation store has no evaluation tokens to analyse; harvest more tokens.")
    chosen = np.unique(ctx_ids)[:n_contexts]
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
    )
