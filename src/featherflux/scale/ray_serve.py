"""The image service on Ray Serve: the same HTTP API as `featherflux serve`, one pipeline per replica.

Design choices:
- Each replica is the single-process server: it loads one pipeline and builds `featherflux.serve.api.create_app`
  over it at replica start (Serve's late-bound ingress, `__serve_build_asgi_app__`), so both servers share every
  endpoint, validation rule and error.
- Routing and scaling follow queue depth: Serve's router sends each request to the less loaded of two sampled
  replicas (by ongoing requests), and its autoscaler keeps ongoing requests per replica near
  `target_ongoing_requests`. A replica's ongoing requests are its waiting OpenAI calls; jobs submitted through
  `/v1/jobs` return at once and are not counted.
- Each replica owns one `JobQueue` whose persistent file is named after the replica's rank (0..N-1, reused when the
  deployment restarts), so a restarted replica resumes its jobs. Images go to one output folder that every replica
  writes (a shared file system on a multi-node cluster), so any replica can serve `/v1/files/{name}`.
- A job lives on the replica that took it; `job_board.py` lets any replica answer, stream and cancel it.
- With `parallel` set, a replica is a group of `ranks` processes running one split pipeline (`featherflux.parallel`):
  the replica is rank 0 and serves; it starts the other ranks as `featherflux serve` processes on its own GPUs
  (Ray gives the replica all of them; rank i takes `cuda:i`), which follow its calls (`featherflux.serve.ranks`).

People who write their own Serve config import the application builder:
    import_path: featherflux.scale.ray_serve:app
    args: {model: /models/klein, output_dir: /shared/out, autoscale: "1:4", gpus_per_replica: 1}
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import ray
import torch
from ray import serve

from featherflux.errors import UserError
from featherflux.pipeline import load_pipeline
from featherflux.scale.job_board import QUEUE_FILE, shared_jobs
from featherflux.serve.api import create_app
from featherflux.serve.ranks import LeaderPipeline

APP_NAME = "featherflux"
TARGET_ONGOING_REQUESTS = 2  # per replica: one image running, one waiting, before the autoscaler adds a replica


@dataclass
class ReplicaSettings:
    """What each replica needs to load its pipeline and build the HTTP app (the `featherflux serve` options)."""

    model: str
    output_dir: str = "featherflux-outputs"
    api_keys: str | None = None
    max_queue: int = 64
    max_batch: int = 4
    job_timeout: float = 600.0
    rate_limit: float = 120.0  # per key and per replica
    burst: int = 30
    drain_seconds: float = 30.0
    metrics_public: bool = False  # /metrics without an API key
    lora_dir: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # "bfloat16", ...; None keeps the checkpoint's
    placement: dict = field(default_factory=dict)  # vram, ram, offload, quantize: passed to load_pipeline
    text_encoder: str | None = None  # URL of a `featherflux encode-server` every replica encodes prompts on
    text_encoder_token: str | None = None
    parallel: str | None = None  # one pipeline split over `ranks` processes per replica (featherflux.parallel)
    parallel_degree: int | None = None
    ranks: int = 1

    def follower_command(self) -> list[str]:
        """The `featherflux serve` command line of a replica's other ranks (they load and follow, never listen)."""
        argv = [sys.executable, "-m", "featherflux", "serve", "--model", self.model, "--device", self.device,
                "--parallel", str(self.parallel)]
        if self.parallel_degree is not None:
            argv += ["--parallel-degree", str(self.parallel_degree)]
        if self.dtype is not None:
            argv += ["--dtype", self.dtype]
        for name, value in self.placement.items():
            if value is True:
                argv.append(f"--{name}")
            elif value is not None and value is not False:
                argv += [f"--{name}", str(value)]
        return argv


@serve.deployment
@serve.ingress()
class ImageService:
    def __init__(self, settings: ReplicaSettings):
        self.settings = settings
        self.followers = _start_followers(settings) if settings.parallel else []
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        self.pipe = load_pipeline(
            settings.model,
            device=settings.device,
            dtype=dtype,
            text_encoder=settings.text_encoder,
            text_encoder_token=settings.text_encoder_token,
            parallel=settings.parallel,
            parallel_degree=settings.parallel_degree,
            **settings.placement,
        )
        if settings.parallel:
            self.pipe = LeaderPipeline(self.pipe)

    def __del__(self):
        if self.followers:
            self.pipe.close()
            for process in self.followers:
                process.wait(timeout=30)

    def __serve_build_asgi_app__(self):
        s = self.settings
        rank = serve.get_replica_context().rank.rank
        output_dir = Path(s.output_dir)
        loras = {p.stem: p for p in sorted(Path(s.lora_dir).glob("*.safetensors"))} if s.lora_dir else None
        app = create_app(self.pipe, api_keys=Path(s.api_keys) if s.api_keys else None, max_queue=s.max_queue,
                         output_dir=output_dir, max_batch=s.max_batch, job_timeout=s.job_timeout,
                         rate_limit=(s.rate_limit, s.burst), loras=loras, drain_seconds=s.drain_seconds,
                         metrics_public=s.metrics_public,
                         state_file=output_dir / QUEUE_FILE.format(rank=rank))
        return shared_jobs(app, replica=rank, api_keys=Path(s.api_keys) if s.api_keys else None)


def _start_followers(settings: ReplicaSettings) -> list[subprocess.Popen]:
    """Make this replica rank 0 of a local process group and start ranks 1..N-1 (they join when they load)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = {"WORLD_SIZE": str(settings.ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(group, RANK="0", LOCAL_RANK="0")
    return [
        subprocess.Popen(settings.follower_command(), env=os.environ | group | {"RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(1, settings.ranks)
    ]


def build_app(settings: ReplicaSettings, *, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0) -> serve.Application:
    """The Serve application: `replicas` fixed replicas, or `autoscale=(min, max)` replicas scaled on queue depth."""
    if settings.lora_dir is not None and not Path(settings.lora_dir).is_dir():
        raise UserError(f"--lora-dir {settings.lora_dir} is not a folder")
    options: dict = {
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        # A replica takes as many requests as its own queue holds; the router holds the rest back.
        "max_ongoing_requests": settings.max_queue,
    }
    if autoscale:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise UserError(f"--autoscale {low}:{high}: use MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": TARGET_ONGOING_REQUESTS}
    else:
        if replicas < 1:
            raise UserError(f"--replicas {replicas}: use at least 1")
        options["num_replicas"] = replicas
    return ImageService.options(**options).bind(settings)


def parse_autoscale(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high)
    except ValueError:
        raise UserError(f"--autoscale {text!r}: use MIN:MAX, for example 1:4") from None


def app(args: dict) -> serve.Application:
    """Application builder for Serve config files: `args` holds ReplicaSettings fields, plus optionally
    `replicas`, `autoscale` ("MIN:MAX"), `gpus_per_replica` and `cpus_per_replica`."""
    args = dict(args)
    deploy = {"replicas": int(args.pop("replicas", 1)),
              "gpus_per_replica": float(args.pop("gpus_per_replica", 0.0)),
              "cpus_per_replica": float(args.pop("cpus_per_replica", 1.0))}
    if "autoscale" in args:
        deploy["autoscale"] = parse_autoscale(str(args.pop("autoscale")))
    unknown = set(args) - {f.name for f in fields(ReplicaSettings)}
    if unknown:
        raise UserError(f"unknown featherflux Serve args {sorted(unknown)}; known: "
                        f"{sorted(asdict(ReplicaSettings(model='')))} and replicas, autoscale, gpus_per_replica")
    return build_app(ReplicaSettings(**args), **deploy)


def deploy(settings: ReplicaSettings, *, host: str, port: int, **options) -> None:
    """Deploy the service on the connected Ray cluster, listening on host:port; returns once replicas are up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, **options), name=APP_NAME, route_prefix="/", blocking=False)


def run(settings: ReplicaSettings, *, host: str, port: int, address: str | None = None, **options) -> None:
    """Join the Ray cluster at `address` (or start a local one), deploy, and serve until Ctrl-C."""
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    ray.init(address=address, include_dashboard=False)
    deploy(settings, host=host, port=port, **options)
    print(f"featherflux: serving {settings.model} on Ray Serve at http://{host}:{port}/ (images in "
          f"{settings.output_dir})", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
