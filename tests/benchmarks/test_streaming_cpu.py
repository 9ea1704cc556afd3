"""benchmarks/streaming_cpu.py runs (its streamed forwards equal diffusers') and reports every row."""

import re
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "streaming_cpu.py"


def test_it_reports_the_overhead_of_each_way_to_stream(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--rounds", "1"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    for label in ("featherflux streamed", "featherflux streamed, functional_call", "diffusers group offload"):
        assert re.search(rf"^{label}: [\d.]+ ms per forward, -?\d+ us of overhead per block$", out, re.MULTILINE), out
    for label in ("featherflux streamed", "featherflux streamed, functional_call"):
        assert re.search(rf"^{label} / diffusers group offload, overhead: -?[\d.]+$", out, re.MULTILINE), out
