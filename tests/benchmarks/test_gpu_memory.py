"""benchmarks/gpu_memory.py end to end in its --small mode (a tiny DiT on CPU): each plan row is measured, nothing
streamed outlives its phase, and the JSON and markdown it writes agree."""

import json
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_small_run_writes_every_row(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it shares its table code with gpu_speed.py
    script = BENCHMARKS / "gpu_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--small", "--steps", "2", "--out", str(tmp_path)])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:
        assert exit.code == 0
    result = json.loads((tmp_path / "gpu_memory.json").read_text())
    rows = {r["name"].split(",")[0]: r for r in result["rows"]}
    for plan in ("device: bf16", "device: int8"):
        row = rows[plan]
        assert row["seconds"] > 0 and row["x_resident"] > 0, row
        assert row["pinned_gib"] > 0  # half the blocks streamed: packed on the host
        assert row["left_gib"] == 0  # the phase closed its streamer
    assert rows["diffusers: resident"]["seconds"] > 0
    assert rows["diffusers: enable_group_offload(block_level"]["note"].startswith("skipped: ")
    assert (tmp_path / "gpu_memory.md").read_text().count("\n| small |") == len(result["rows"])
    assert "wrote" in capsys.readouterr().out
