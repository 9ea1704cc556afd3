"""The image service on Ray Serve: the same HTTP API as `featherflux serve`, one pipeline per replica.

Ray Serve's router sends each request to the less loaded of two sampled replicas (by ongoing requests), and
its autoscaler adds or removes replicas to hold the ongoing requests per replica near a target: routing and
scaling both follow queue depth. Each replica owns one `JobQueue`; its persistent queue file is named after the
replica's rank so a restarted replica resumes its jobs. Images go to one output folder that every replica
writes (a shared file system on a multi-node cluster), so any replica can serve `/v1/files/{name}`.

People who write their own Serve config can import the application builder:
    `import_path: featherflux.scale.ray_serve:app` with `args: {model: ..., output_dir: ...}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray import serve


@dataclass
class ReplicaSettings:
    model: str
    output_dir: str = "outputs"
    api_keys: str | None = None
    max_queue: int = 64
    load_kwargs: dict = field(default_factory=dict)  # device, dtype, vram, offload, quantize, text_encoder...


@serve.deployment
@serve.ingress()
class ImageService:
    def __init__(self, settings: ReplicaSettings):
        from featherflux.pipeline import load_pipeline

        self.settings = settings
        self.pipe = load_pipeline(settings.model, **settings.load_kwargs)

    def __serve_build_asgi_app__(self):
        from featherflux.serve.api import create_app

        s = self.settings
        # Ranks are 0..N-1 and are reused when the deployment restarts, so replica k finds its own saved jobs.
        rank = serve.get_replica_context().rank.rank
        output_dir = Path(s.output_dir)
        return create_app(self.pipe, api_keys=Path(s.api_keys) if s.api_keys else None, max_queue=s.max_queue,
                          output_dir=output_dir, state_file=output_dir / f"queue-replica-{rank}.jsonl")


def build_app(settings: ReplicaSettings, *, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0) -> serve.Application:
    options: dict = {
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        # A replica takes as many requests as its own queue holds; Serve queues the rest at the router.
        "max_ongoing_requests": settings.max_queue,
    }
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 2}
    else:
        options["num_replicas"] = replicas
    return ImageService.options(**options).bind(settings)


def app(args: dict) -> serve.Application:
    """Application builder for Serve config files: `args` holds ReplicaSettings fields plus `replicas`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    return build_app(ReplicaSettings(**args), replicas=replicas)


def run(settings: ReplicaSettings, *, host: str, port: int, address: str | None = None, **deploy) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy the service on host:port, and block until Ctrl-C."""
    import ray

    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, **deploy), name="featherflux", route_prefix="/", blocking=True)
