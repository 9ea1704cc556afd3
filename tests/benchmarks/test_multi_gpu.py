"""benchmarks/multi_gpu.py end to end in its --cpu mode: the tiny demo DiT on 1 and 2 gloo processes, each mode
measured (or skipped with a reason), speed-ups against the 1-rank rows, and the JSON and markdown agreeing."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "multi_gpu.py"


def test_cpu_run_on_one_and_two_ranks(tmp_path):
    command = [sys.executable, str(BENCHMARK), "--cpu", "--ranks", "1", "2", "--sizes", "64", "--steps", "2",
               "--modes", "ulysses", "ring", "tensor", "cfg", "--out", str(tmp_path)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert result["device"] == "CPU (gloo)" and result["dtype"] == "float32"
    measured = {(r["ranks"], r["mode"], r["batch"]): r for r in result["rows"] if r["impl"] == "featherflux"}
    for key in ((1, "single", 1), (1, "single", 2), (2, "ulysses", 1), (2, "ring", 1), (2, "tensor", 1), (2, "cfg", 2)):
        row = measured[key]
        assert row["seconds"] > 0 and row["speedup"] > 0 and row["family"] == "demo", key
    assert measured[(2, "tensor", 1)]["layout"] == "cfg1 tp2 u1 r1"
    assert measured[(1, "single", 1)]["speedup"] == 1.0
    diffusers = [r for r in result["rows"] if r["impl"] == "diffusers"]
    assert [r["ranks"] for r in diffusers] == [1, 2]
    assert all(r["seconds"] is None and r["note"].startswith("skipped: ") for r in diffusers)
    table = (tmp_path / "multi_gpu.md").read_text()
    assert table.count("\n| ") == len(result["rows"]) + 2  # the header and its rule, then one line per row
    assert "| 2 | demo | 64x64 | featherflux | ring | cfg1 tp1 u1 r2 | 1 |" in table
    assert "wrote" in done.stdout
