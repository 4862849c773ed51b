"""Analysis throughput vs the model's forward pass on the same number of tokens.

    python benchmarks/bench_analyze.py [--contexts 100] [--no-model]

Runs the streaming pass of `engine.analysis` for the demo's three SAEs (dense TopK, Switch,
Scale e=2; M = 4608, N = 16, k = 32, d = 576) over random activations shaped like a harvest,
and times the offline default model's forward pass (up to the middle-layer hook, as the
harvest runs it) on the same number of tokens. Reports the SAE + statistics overhead as a
fraction of the forward cost (issue target ≤ 30%), per SAE and for all three together, plus
the whole analysis (pass 2, neighbours, logits, map, DB write). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.analysis.config import AnalysisConfig  # noqa: E402
from engine.analysis.pipeline import analyze  # noqa: E402
from engine.sae import SAEConfig, build_sae  # noqa: E402


class _TokenSet:
    def __init__(self, x, ctx, pos):
        self._x, self.context_ids, self.positions, self.n_tokens = x, ctx, pos, len(x)

    def read(self, idx):
        return self._x[idx]


class _Acts:
    model_name, hook, path, norm_scale = "synthetic", "blocks.15.hook_resid_post", "", 1.0

    def __init__(self, n_ctx, L, d, vocab, seed=0):
        rng = np.random.default_rng(seed)
        self.d_in = d
        self.tokens = rng.integers(0, vocab, (n_ctx, L)).astype(np.int32)
        self.domains = [("pydoc", "bible", "fortunes")[c % 3] for c in range(n_ctx)]
        cc, pp = np.meshgrid(np.arange(n_ctx), np.arange(L), indexing="ij")
        self.ev = _TokenSet(rng.standard_normal((n_ctx * L, d)).astype(np.float32),
                            cc.reshape(-1), pp.reshape(-1))

    def contexts(self):
        return self.tokens, self.domains, ["eval"] * len(self.domains)

    def split(self, name):
        return self.ev


class _Model:
    name, d_model, n_layers, has_lm_head = "synthetic", 576, 30, True

    def __init__(self, tok=None, W_U=None):
        self.tok, self.W_U = tok, W_U if W_U is not None else torch.randn(576, 49152)

    def token_strs(self, ids):
        return [self.tok.decode([i]) if self.tok else f"t{i}" for i in ids]

    def unembed_matrix(self):
        return self.W_U


def model_forward_rate(n_tokens: int, L: int) -> tuple[float, object | None]:
    from engine.models import DEFAULT_MODEL, load_model

    m = load_model(DEFAULT_MODEL)
    hook = m.resolve_hook(None)
    toks = torch.randint(0, 49152, (max(1, n_tokens // L), L))
    m.activations(toks[:1], hook)  # warm
    t = time.perf_counter()
    for i in range(0, len(toks), 8):
        m.activations(toks[i : i + 8], hook)
    return len(toks) * L / (time.perf_counter() - t), m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=100)
    ap.add_argument("--forward-tokens", type=int, default=4096)
    ap.add_argument("--no-model", action="store_true", help="use DESIGN.md's 1.5k tok/s forward figure")
    args = ap.parse_args()
    torch.manual_seed(0)
    L, d = 128, 576
    saes = [("topk", build_sae(SAEConfig(arch="topk", width=4608, k=32))),
            ("switch", build_sae(SAEConfig(arch="switch", width=4608, experts=16, k=32))),
            ("scale-e2", build_sae(SAEConfig(arch="scale", width=4608, experts=16, active=2, k=32)))]
    fwd_rate, fwd_note = 1500.0, "DESIGN.md figure (not measured)"
    model = _Model()
    if not args.no_model:
        try:
            fwd_rate, lm = model_forward_rate(args.forward_tokens, L)
            fwd_note = "measured: offline default model up to the default hook"
            model = _Model(lm.tokenizer, lm.unembed_matrix().float())
        except Exception as e:  # model not available here: fall back to the documented rate
            print(f"(model forward not measured: {e})")
    acts = _Acts(args.contexts, L, d, 49152)
    n_tok = args.contexts * L
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        db = analyze([(n, s, {}) for n, s in saes], acts, model, Path(tmp) / "b.duckdb",
                     AnalysisConfig(analysis_contexts=args.contexts, umap=True), progress=False)
        total = time.perf_counter() - t
        import duckdb

        con = duckdb.connect(str(db), read_only=True)
        timing = json.loads(con.execute("SELECT value FROM meta WHERE key = 'timing'").fetchone()[0])
        con.close()
    fwd_s = n_tok / fwd_rate
    rows = []
    for name, tm in timing["per_sae"].items():
        pass1 = tm["encode_seconds"] + tm["stats_seconds"]
        rows.append({"sae": name, "encode_s": tm["encode_seconds"], "stats_s": tm["stats_seconds"],
                     "pass1_tok_per_s": round(n_tok / pass1), "overhead_vs_forward": round(pass1 / fwd_s, 4),
                     **{k: v for k, v in tm.items() if k not in ("encode_seconds", "stats_seconds")}})
    all_pass1 = sum(r["encode_s"] + r["stats_s"] for r in rows)
    print(f"tokens {n_tok:,}; model forward {fwd_rate:,.0f} tok/s ({fwd_note})")
    print(f"{'sae':10s} {'encode s':>9s} {'stats s':>8s} {'tok/s':>9s} {'overhead':>9s}")
    for r in rows:
        print(f"{r['sae']:10s} {r['encode_s']:9.2f} {r['stats_s']:8.2f} {r['pass1_tok_per_s']:9,d} "
              f"{100 * r['overhead_vs_forward']:8.1f}%")
    print(f"{'all three':10s} {'':9s} {'':8s} {round(n_tok / all_pass1):9,d} {100 * all_pass1 / fwd_s:8.1f}%")
    print(f"whole analysis (both passes, geometry, UMAP, write): {total:.1f} s")
    print(json.dumps({"tokens": n_tok, "forward_tok_per_s": round(fwd_rate), "forward_note": fwd_note,
                      "per_sae": rows, "overhead_all": round(all_pass1 / fwd_s, 4),
                      "analysis_total_s": round(total, 1), "read_s": timing["read_seconds"]}))


if __name__ == "__main__":
    main()
