"""Batch generation: render every pending job of a JSONL file, in this process or on Ray Data actors.

Both runners render a job with the same function (`scale.render.render_job`) and write the same PNG bytes, so a
batch run with `--ray` and one without give identical files for the same seeds. The driver appends a manifest line
as soon as each PNG is in place; a rerun skips what the manifest already holds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from featherflux.pipeline import load_pipeline
from featherflux.scale.jobs import Manifest, read_jobs
from featherflux.scale.ray_batch import render_on_ray
from featherflux.scale.render import render_or_error

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class BatchReport:
    done: int  # rendered in this run
    skipped: int  # already in the manifest
    failed: list[str]  # "id: reason"
    problems: list[str]  # malformed lines, "line N: reason"


def run_batch(
    jobs_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str,
    *,
    use_ray: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> BatchReport:
    jobs_file, output_dir = Path(jobs_file), Path(output_dir)
    jobs, problems = read_jobs(jobs_file)
    for problem in problems:
        tqdm.write(f"featherflux batch: skipped {problem}", file=sys.stderr)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir / MANIFEST_NAME)
    pending = [job for job in jobs if not manifest.is_done(job, output_dir)]
    skipped = len(jobs) - len(pending)
    base_dir = jobs_file.parent.resolve()
    report = BatchReport(done=0, skipped=skipped, failed=[], problems=problems)
    if not pending:
        return report
    if use_ray:
        results = render_on_ray(pending, output_dir, base_dir, model, workers=workers, address=ray_address,
                                device=device, dtype=dtype)
    else:
        results = _render_in_process(pending, output_dir, base_dir, model, device=device, dtype=dtype)
    with tqdm(total=len(jobs), initial=skipped, desc="batch", unit="image") as bar:
        for record in results:
            if "error" in record:
                report.failed.append(f"{record['id']}: {record['error']}")
            else:
                manifest.append(record)
                report.done += 1
            bar.update(1)
    return report


def _render_in_process(jobs, output_dir, base_dir, model, *, device, dtype):
    pipe = load_pipeline(model, device=device, dtype=dtype)
    for job in jobs:
        yield render_or_error(pipe, job, output_dir, base_dir, model)
