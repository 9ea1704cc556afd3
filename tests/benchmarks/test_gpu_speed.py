"""benchmarks/gpu_speed.py end to end in its --small mode (a tiny DiT on CPU): every row is measured or skipped with
a reason, and the JSON and markdown it writes agree."""

import json
import runpy
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_speed.py"


def test_small_run_writes_every_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARK), "--small", "--steps", "2", "--out", str(tmp_path)])
    try:
        runpy.run_path(str(BENCHMARK), run_name="__main__")
    except SystemExit as exit:
        assert exit.code == 0
    result = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert result["device"] == "CPU" and result["ceiling_tflops"] > 0
    rows = {r["name"]: r for r in result["rows"]}
    diffusers_compiled = next(name for name in rows if name.startswith("diffusers compiled, "))  # its fastest backend
    for run in ("eager, sdpa", "compiled, sdpa", "compiled + fp8, sdpa", "first-block cache 0.12, sdpa",
                "diffusers eager, native", diffusers_compiled):
        assert rows[run]["seconds"] > 0 and rows[run]["ceiling_fraction"] > 0, run
    assert rows["compiled, sdpa"]["compile_seconds"] > 0
    assert "error vs bf16" in rows["compiled + fp8, sdpa"]["note"]
    assert rows["eager, flash3"]["seconds"] is None and rows["eager, flash3"]["note"].startswith("skipped: ")
    table = (tmp_path / "gpu_speed.md").read_text()
    assert table.count("\n| small |") == len(result["rows"])
    assert "wrote" in capsys.readouterr().out
