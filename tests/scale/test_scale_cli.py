"""The `--ray` flags of `featherflux serve` and `featherflux batch` reach the scale functions intact."""

from pathlib import Path

import pytest

from featherflux.cli import build_parser, main
from featherflux.scale import ray_serve


def test_serve_ray_flags_become_replica_settings(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ray_serve, "run", lambda settings, **kw: calls.append((settings, kw)))
    argv = ["serve", "--ray", "--model", "/models/klein", "--autoscale", "1:3", "--address", "auto",
            "--output-dir", str(tmp_path), "--max-batch", "2", "--port", "9000"]
    assert main(argv) == 0
    (settings, kw), = calls
    assert (settings.model, settings.output_dir, settings.max_batch) == ("/models/klein", str(tmp_path), 2)
    assert kw == {"host": "127.0.0.1", "port": 9000, "address": "auto", "replicas": 1, "autoscale": (1, 3),
                  "gpus_per_replica": 0.0, "cpus_per_replica": 1.0}
    assert main(["serve", "--ray", "--model", "m", "--autoscale", "two"]) == 2  # a UserError, not a traceback


def test_replicas_and_autoscale_exclude_each_other():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ray", "--replicas", "2", "--autoscale", "1:2"])
    args = build_parser().parse_args(["batch", "jobs.jsonl", "--output", "out", "--ray", "--workers", "2"])
    assert (args.ray, args.workers, Path(args.jobs)) == (True, 2, Path("jobs.jsonl"))
