"""Batch generation on Ray Data: one pipeline actor per GPU (or per CPU slot), jobs streamed through them.

Each actor loads the pipeline once and renders jobs with the same `render_or_error` as the in-process runner,
writing PNGs straight into the output folder (a shared file system on a multi-node cluster). Only small
manifest records travel back to the driver, which appends them to the manifest as they arrive.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from featherflux.errors import MissingExtraError
from featherflux.pipeline import load_pipeline
from featherflux.scale.jobs import BatchJob
from featherflux.scale.render import render_or_error


class JobRenderer:
    """A Ray Data actor: `__call__` gets a batch of serialised jobs and returns their manifest records."""

    def __init__(self, model: str, output_dir: str, base_dir: str, device: str, dtype: str | None):
        torch.set_num_threads(1)
        self.model = model
        self.output_dir, self.base_dir = Path(output_dir), Path(base_dir)
        self.pipe = load_pipeline(model, device=device, dtype=getattr(torch, dtype) if dtype else None)

    def __call__(self, batch: dict) -> dict:
        records = []
        for text in batch["job"]:
            fields = json.loads(text)
            fields["loras"] = tuple(tuple(item) for item in fields["loras"])
            fields["references"] = tuple(fields["references"])
            job = BatchJob(**fields)
            records.append(json.dumps(render_or_error(self.pipe, job, self.output_dir, self.base_dir, self.model)))
        return {"record": records}


def render_on_ray(jobs: list[BatchJob], output_dir: Path, base_dir: Path, model: str, *, workers: int | None,
                  address: str | None, device: str, dtype: torch.dtype | None):
    """Yield manifest records (or error records) as the actors finish jobs."""
    try:
        import ray  # an optional extra: imported only when a batch runs on it
    except ImportError:
        raise MissingExtraError("featherflux batch --ray", "ray") from None

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    use_gpu = device.startswith("cuda")
    # One actor per GPU, or per CPU slot with one intra-op thread: on CPU, N single-threaded pipelines give more
    # images per second than one pipeline on N threads, and never spin-wait on each other's cores.
    slots = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))
    workers = max(1, min(workers or slots, len(jobs)))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar covers the whole batch
    dataset = ray.data.from_items([{"job": json.dumps(asdict(job))} for job in jobs], override_num_blocks=len(jobs))
    records = dataset.map_batches(
        JobRenderer,
        fn_constructor_kwargs={"model": model, "output_dir": str(output_dir.resolve()), "base_dir": str(base_dir),
                               "device": device, "dtype": str(dtype).removeprefix("torch.") if dtype else None},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    for row in records.iter_rows():
        yield json.loads(row["record"])
