"""`featherflux serve`: the OpenAI-compatible image server (see `featherflux.serve.api`) over one pipeline."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from featherflux.cli.options import (
    add_attention,
    add_compile,
    add_device,
    add_download,
    add_parallel,
    add_placement,
    add_text_encoder,
    pipeline_options,
)
from featherflux.cli.serve_ray import add_ray_arguments, serve_on_ray
from featherflux.errors import MissingExtraError, UserError
from featherflux.parallel import is_main_process
from featherflux.pipeline import load_pipeline
from featherflux.serve.ranks import LeaderPipeline, follow


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP: OpenAI images API, jobs, metrics, web page")
    p.add_argument("--model", default="demo", help="pipeline folder, hub repo id, or 'demo' (default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8800)
    p.add_argument("--api-keys", type=Path, help="keys file made by `featherflux keys add`; without it, no auth")
    p.add_argument("--max-queue", type=int, default=64, help="waiting jobs before new ones get 429 (default 64)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("featherflux-outputs"),
        help="where images, uploads and the queue file live (default ./featherflux-outputs)",
    )
    p.add_argument("--max-batch", type=int, default=4, help="images per pipeline call; 1 switches batching off")
    p.add_argument("--job-timeout", type=float, default=600.0, help="seconds a job may run (default 600)")
    p.add_argument("--rate-limit", type=float, default=120.0, help="job requests per minute per key (default 120)")
    p.add_argument("--burst", type=int, default=30, help="job requests a key may make at once (default 30)")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long running jobs may finish before they are saved for the next start",
    )
    p.add_argument("--lora-dir", type=Path, help="folder of *.safetensors LoRAs requests may name (by file stem)")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without an API key (for a Prometheus scraper); by default it needs one")
    add_device(p)
    add_attention(p)
    add_compile(p)
    add_parallel(p)
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="with --parallel: start N processes (one per GPU) that run one pipeline; rank 0 serves HTTP")
    add_download(p)
    add_placement(p)
    add_text_encoder(p)
    add_ray_arguments(p)  # --ray, --replicas, --autoscale, --gpus-per-replica, --address
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ray:  # replicas of this server on Ray Serve (cli.serve_ray); --gpus sizes each replica's group there
        return serve_on_ray(args)
    try:  # the serve extra is optional: fastapi and uvicorn are imported only to serve
        from featherflux.serve.api import create_app, run_server
    except ImportError:
        raise MissingExtraError("featherflux serve", "serve") from None

    if args.max_queue < 1 or args.max_batch < 1:
        raise UserError("--max-queue and --max-batch must be at least 1")
    if args.gpus > 1 and args.parallel is None:
        raise UserError(f"--gpus {args.gpus} runs one pipeline split over {args.gpus} processes: add --parallel MODE")
    if args.gpus > 1 and "RANK" not in os.environ:  # start the ranks: this command again, under torchrun
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus)]
        os.execv(sys.executable, [*torchrun, "-m", "featherflux", *_without_gpus(sys.argv[1:])])
    loras = {}
    if args.lora_dir is not None:
        if not args.lora_dir.is_dir():
            raise UserError(f"--lora-dir {args.lora_dir} is not a folder")
        loras = {p.stem: p for p in sorted(args.lora_dir.glob("*.safetensors"))}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = load_pipeline(args.model, **pipeline_options(args))
    if args.parallel is not None:
        if not is_main_process():  # the other ranks make rank 0's calls until it stops
            follow(pipe)
            return 0
        pipe = LeaderPipeline(pipe)
    app = create_app(
        pipe,
        api_keys=args.api_keys,
        max_queue=args.max_queue,
        output_dir=args.output_dir,
        max_batch=args.max_batch,
        job_timeout=args.job_timeout,
        rate_limit=(args.rate_limit, args.burst),
        loras=loras,
        drain_seconds=args.drain_seconds,
        metrics_public=args.metrics_public,
    )
    print(
        f"featherflux: serving {args.model} on http://{args.host}:{args.port}/ (images in {args.output_dir})",
        file=sys.stderr,
    )
    try:
        run_server(app, host=args.host, port=args.port)
    finally:
        if args.parallel is not None:
            pipe.close()
    return 0


def _without_gpus(argv: list[str]) -> list[str]:
    """The command line each rank runs: this one without `--gpus N`."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--gpus="):
            skip = False
            continue
        skip = arg == "--gpus"
        if not skip:
            out.append(arg)
    return out
