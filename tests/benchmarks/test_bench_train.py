"""bench_train.py end to end on a tiny size: the throughput table, the phase timings and their
plot (the numbers themselves are the benchmark's business, not a test's)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_writes_throughput_phases_and_plot(tmp_path):
    out = tmp_path / "train.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--width", "64",
         "--experts", "4", "--k", "4", "--batch", "64", "--steps", "2", "--repeats", "2",
         "--phase-steps", "3", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert {"topk", "switch", "scale e=1", "scale e=2", "scale e=4"} <= set(rows)
    assert rows["topk"]["ratio_to_topk"] == 1.0
    for name in ("topk", "switch", "scale e=1", "scale e=2", "scale e=4"):
        phases = rows[name]["phases_ms"]
        assert set(phases) == {"encode", "decode", "loss", "backward", "optimiser"}
        assert all(v > 0 for v in phases.values())
    assert (tmp_path / "train_phases.png").stat().st_size > 0
    assert "ms per step, median of 3 steps phase by phase" in run.stdout
