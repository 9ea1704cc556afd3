"""Batch generation: render every pending job of a JSONL file, in this process or on Ray Data actors.

Both runners render a job with the same function (`render_job`) and write the same PNG bytes, so a batch
run with `--ray` and one without give identical files for the same seeds. The driver appends a manifest line
as soon as each PNG is in place; a rerun skips what the manifest already holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from featherflux.errors import UserError
from featherflux.scale.jobs import BatchJob, Manifest, job_record, read_jobs

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class BatchReport:
    done: int  # rendered in this run
    skipped: int  # already in the manifest
    failed: list[str]  # "id: reason"
    problems: list[str]  # malformed lines, "line N: reason"


def load_references(job: BatchJob, base_dir: Path) -> list:
    from featherflux.images import open_reference_image

    return [open_reference_image(base_dir / ref) for ref in job.references]


def render_job(pipe, job: BatchJob, output_dir: Path, base_dir: Path, model_id: str) -> dict:
    """Render one job with `pipe`, write its PNG atomically with its parameters, and return its manifest record."""
    from featherflux.images import save_png

    # exactly the job's adapters (loaded once, cached by path); none for a job without LoRAs
    pipe.set_loras({str(base_dir / path): (base_dir / path, scale) for path, scale in job.loras})
    references = load_references(job, base_dir)
    family = pipe.family
    steps = job.steps or family.default_steps
    guidance = family.default_guidance if job.guidance is None else job.guidance
    image = pipe(
        prompt=job.prompt,
        image=references or None,
        width=job.width,
        height=job.height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(job.seed),
        output_type="pil",
        show_progress=False,
    ).images[0]
    parameters = {
        "prompt": job.prompt,
        "model": model_id,
        "seed": job.seed,
        "width": image.width,
        "height": image.height,
        "steps": steps,
        "guidance": guidance,
        "loras": [f"{path}:{scale}" for path, scale in job.loras],
        "references": list(job.references),
    }
    save_png(image, output_dir / job.file_name, parameters)
    return job_record(job, width=image.width, height=image.height, steps=steps, guidance=guidance, model=model_id)


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
        tqdm.write(f"featherflux batch: skipped {problem}")
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir / MANIFEST_NAME)
    pending = [job for job in jobs if not manifest.is_done(job, output_dir)]
    skipped = len(jobs) - len(pending)
    base_dir = jobs_file.parent.resolve()
    report = BatchReport(done=0, skipped=skipped, failed=[], problems=problems)
    if not pending:
        return report
    if use_ray:
        from featherflux.scale.ray_batch import render_on_ray

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
    from featherflux.pipeline import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype)
    for job in jobs:
        yield render_or_error(pipe, job, output_dir, base_dir, model)


def render_or_error(pipe, job: BatchJob, output_dir: Path, base_dir: Path, model_id: str) -> dict:
    """A job's bad input fails that job only; the batch goes on and reports it."""
    try:
        return render_job(pipe, job, output_dir, base_dir, model_id)
    except UserError as e:
        return {"id": job.id, "line": job.line, "error": str(e)}
