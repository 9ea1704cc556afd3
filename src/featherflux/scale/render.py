"""Rendering one batch job: the same function for the in-process runner and the Ray Data actors, so both write
the same PNG bytes for the same job."""

from __future__ import annotations

from pathlib import Path

import torch

from featherflux.errors import UserError
from featherflux.images import open_reference_image, save_png
from featherflux.scale.jobs import BatchJob, job_record


def render_job(pipe, job: BatchJob, output_dir: Path, base_dir: Path, model_id: str) -> dict:
    """Render one job with `pipe`, write its PNG atomically with its parameters, and return its manifest record."""
    # exactly the job's adapters (loaded once, cached by path); none for a job without LoRAs
    pipe.set_loras({str(base_dir / path): (base_dir / path, scale) for path, scale in job.loras})
    references = [open_reference_image(base_dir / ref) for ref in job.references]
    request = pipe.request(
        job.prompt,
        image=references or None,
        width=job.width,
        height=job.height,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        generator=torch.Generator("cpu").manual_seed(job.seed),
        output_type="pil",
        show_progress=False,
    )
    image = pipe.generate(request)[0]
    parameters = request.image_parameters(
        prompt=job.prompt,
        model=model_id,
        seed=job.seed,
        references=job.references,
        loras=[f"{path}:{scale}" for path, scale in job.loras],
    )
    save_png(image, output_dir / job.file_name, parameters.as_dict())
    return job_record(
        job,
        width=request.width,
        height=request.height,
        steps=request.num_steps,
        guidance=request.guidance,
        model=model_id,
    )


def render_or_error(pipe, job: BatchJob, output_dir: Path, base_dir: Path, model_id: str) -> dict:
    """A job's bad input fails that job only; the batch goes on and reports it."""
    try:
        return render_job(pipe, job, output_dir, base_dir, model_id)
    except UserError as e:
        return {"id": job.id, "line": job.line, "error": str(e)}
