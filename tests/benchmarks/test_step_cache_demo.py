"""benchmarks/step_cache_demo.py renders every row; the forecast's passes follow its schedule."""

import re
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cache_demo.py"


def test_every_method_gets_a_row(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--n", "2"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    rows = dict(re.findall(r"^\| ([a-z][^|]*?) \| ([\d.]+) \|", capsys.readouterr().out, re.MULTILINE))
    assert rows["no cache"] == "16.00"
    assert {"first-block 0.12", "first-block 0.5", "reuse 2/2"} <= set(rows)
    # full passes on steps 0, 1, then every second step from 2: 0, 1, 2, 4, ..., 14
    assert rows["forecast 2/2"] == "9.00" and rows["forecast 2/4"] == "6.00"
