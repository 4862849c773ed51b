"""Render time of every explorer page on a synthetic build with ≥ 50,000 features.

    python benchmarks/bench_explorer.py [--features 50000] [--experts 64] [--repeats 20] [--db PATH]

Each page is rendered once to warm the caches, then `--repeats` times through Streamlit's
AppTest (the whole script: app.py + the page, element tree included). The Feature page is
also timed on features it has not shown before (its store queries uncached; the build's
connection and the SAE-level caches warm), Compare on experts and thresholds, Search text and the
map's search on queries not seen before. The issue's target: p95 < 1 s per page once warm.
Prints a table and one JSON line. Inspect text is left out: it runs the model live.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.explorer.synthetic import make_build  # noqa: E402

APP = ROOT / "explorer" / "app.py"
PAGES = ["overview", "experts", "feature_map", "redundancy", "compare", "feature", "search_text",
         "steering"]


def _timed(at, repeats: int, before=None) -> list[float]:
    times = []
    for i in range(repeats):
        if before is not None:
            before(at, i)
        t = time.perf_counter()
        at.run(timeout=60)
        times.append(time.perf_counter() - t)
        if at.exception:
            raise RuntimeError(at.exception[0].value)
    return times


def bench(db: Path, repeats: int, n_features: int, sae: str) -> dict:
    from streamlit.testing.v1 import AppTest

    os.environ["MOESAE_DB"] = str(db)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["sae"] = sae
    at.query_params["feature"] = "7"
    t = time.perf_counter()
    at.run()
    out = {"cold start (open build + overview)": [time.perf_counter() - t]}
    for page in PAGES:
        if page != "overview":
            at.switch_page(f"views/{page}.py")
        t = time.perf_counter()
        at.run(timeout=120)  # first render: fills the caches
        out[f"{page} (cold cache)"] = [time.perf_counter() - t]
        out[page] = _timed(at, repeats)
    rng = np.random.default_rng(0)
    fresh = rng.choice(n_features, repeats, replace=False)

    def new_feature(at, i):
        at.query_params["feature"] = str(int(fresh[i]))

    at.switch_page("views/feature.py")
    out["feature (unseen feature)"] = _timed(at, repeats, new_feature)
    at.switch_page("views/redundancy.py").run()

    def slide(at, i):
        at.slider(key="red_threshold").set_value(round(0.8 + 0.01 * (i % 20), 2))

    out["redundancy (threshold moved)"] = _timed(at, repeats, slide)
    at.switch_page("views/feature_map.py").run()
    words = ["Lo", "Lor", "Lord", "de", "def", "lov", "love", "ki", "kin", "king", "se", "sel",
             "self", "th", "the", "thee", "un", "unt", "unto", "hea"]  # each one a new query

    def search(at, i):
        at.text_input(key="map_search").input(words[i % len(words)])

    out["feature_map (search)"] = _timed(at, repeats, search)
    at.switch_page("views/compare.py").run()
    n_experts = len(at.selectbox(key="cmp_expert").options) - 1

    def expert(at, i):  # each one new queries: that expert's unmatched and shared features
        at.selectbox(key="cmp_expert").set_value(int(i % n_experts))

    out["compare (another expert)"] = _timed(at, repeats, expert)

    def tau(at, i):
        at.slider(key="cmp_tau").set_value(round(0.5 + 0.02 * (i % 20), 2))

    out["compare (threshold moved)"] = _timed(at, repeats, tau)
    at.switch_page("views/search_text.py").run()

    def text(at, i):
        at.text_input(key="search_text").input(words[i % len(words)])

    out["search_text (new query)"] = _timed(at, repeats, text)
    return {k: {"p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
                "p95_ms": round(float(np.percentile(v, 95)) * 1000, 1), "n": len(v)}
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=50_000)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--contexts", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--db", type=Path, default=None, help="reuse/keep this synthetic build")
    args = ap.parse_args()
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.TemporaryDirectory()
        db = Path(tmp.name) / "bench_explorer.duckdb"
    if not db.exists():
        t = time.perf_counter()
        make_build(db, saes=(("switch", "switch"), ("scale-e2", "scale")), n_features=args.features,
                   n_experts=args.experts, n_contexts=args.contexts, ctx_len=128)
        print(f"built a synthetic build with 2 SAEs × {args.features:,} features in "
              f"{time.perf_counter() - t:.1f} s ({db.stat().st_size / 1e6:.0f} MB)")
    res = bench(db, args.repeats, args.features, "switch")
    print(f"{'page':40s} {'p50 ms':>8s} {'p95 ms':>8s} {'n':>4s}")
    for k, v in res.items():
        print(f"{k:40s} {v['p50_ms']:8.1f} {v['p95_ms']:8.1f} {v['n']:4d}")
    print(json.dumps({"features": args.features, "experts": args.experts, "repeats": args.repeats,
                      "render": res}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
