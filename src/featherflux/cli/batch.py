"""`featherflux batch PROMPTS.jsonl --output DIR [--ray]`: render a file of jobs, resumably."""

from __future__ import annotations

import argparse
import sys

from featherflux.cli.options import add_device
from featherflux.scale.batch import run_batch


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="render every job of a JSONL file into PNGs plus a manifest")
    p.add_argument("jobs", help="JSONL file, one job per line: prompt, seed, size, steps, guidance, loras, references")
    p.add_argument("--output", required=True, help="folder for the PNGs and manifest.jsonl")
    p.add_argument("--model", default="demo", help="pipeline folder, hub id in the local cache, or 'demo'")
    add_device(p)
    p.add_argument("--ray", action="store_true", help="run pipeline actors on Ray Data (one per GPU or CPU slot)")
    p.add_argument("--workers", type=int, help="number of Ray actors (default: one per GPU, or per CPU)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one, or RAY_ADDRESS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = run_batch(args.jobs, args.output, args.model, use_ray=args.ray, workers=args.workers,
                       ray_address=args.address, device=args.device, dtype=args.dtype)
    print(f"batch: {report.done} rendered, {report.skipped} already done, {len(report.failed)} failed, "
          f"{len(report.problems)} malformed line(s) skipped", file=sys.stderr)
    for failure in report.failed:
        print(f"  failed {failure}", file=sys.stderr)
    return 1 if report.failed or report.problems else 0
