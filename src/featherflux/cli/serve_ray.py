"""`featherflux serve --ray`: the flags `featherflux serve` adds for Ray Serve, and the call that runs it there.

Ray is an optional extra, so ray itself is imported only when `--ray` runs.
"""

from __future__ import annotations

import argparse

from featherflux.cli.options import dtype_name
from featherflux.errors import MissingExtraError, UserError


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray Serve (many replicas, many machines)")
    ray.add_argument("--ray", action="store_true", help="serve replicas of this server on Ray Serve")
    count = ray.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    count.add_argument("--autoscale", metavar="MIN:MAX", help="scale replicas between MIN and MAX on queue depth")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs each replica holds (default 1 with --device cuda, else 0); fractions share a GPU")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPU slots each replica holds (default 1)")
    ray.add_argument("--address", help="Ray cluster to deploy to, e.g. ray://head:10001 or auto (default: start "
                                       "a local one, or RAY_ADDRESS)")


def serve_on_ray(args: argparse.Namespace) -> int:
    try:  # the ray extra is optional: imported only to serve on Ray
        from featherflux.scale.ray_serve import ReplicaSettings, parse_autoscale, run
    except ImportError:
        raise MissingExtraError("featherflux serve --ray", "ray") from None

    if args.max_queue < 1 or args.max_batch < 1:
        raise UserError("--max-queue and --max-batch must be at least 1")
    placement = {name: getattr(args, name) for name in ("vram", "ram", "offload", "quantize", "download", "revision")}
    placement = {name: value for name, value in placement.items() if value is not None}
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if str(args.device).startswith("cuda") else 0.0
    ranks = 1
    if args.parallel is not None:  # one split pipeline per replica: a process per GPU, or --gpus CPU processes
        ranks = int(gpus) if gpus >= 2 else args.gpus
        if ranks < 2 or (gpus >= 2 and gpus != int(gpus)):
            raise UserError(
                "--parallel with --ray runs a group of processes per replica: give --gpus-per-replica N (whole GPUs, "
                "N >= 2), or --gpus N for CPU processes"
            )
    settings = ReplicaSettings(
        model=str(args.model), output_dir=str(args.output_dir.resolve()),
        api_keys=str(args.api_keys.resolve()) if args.api_keys else None, max_queue=args.max_queue,
        max_batch=args.max_batch, job_timeout=args.job_timeout, rate_limit=args.rate_limit, burst=args.burst,
        drain_seconds=args.drain_seconds, metrics_public=args.metrics_public,
        lora_dir=str(args.lora_dir.resolve()) if args.lora_dir else None, device=args.device,
        dtype=dtype_name(args.dtype), placement=placement,
        text_encoder=args.text_encoder, text_encoder_token=args.text_encoder_token,
        parallel=args.parallel, parallel_degree=args.parallel_degree, ranks=ranks,
    )
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    run(settings, host=args.host, port=args.port, address=args.address, replicas=args.replicas, autoscale=autoscale,
        gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica)
    return 0
