"""`featherflux serve`: the OpenAI-compatible image server (see `featherflux.serve.api`) over one pipeline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from featherflux.errors import UserError
from featherflux.cli.serve_ray import add_ray_arguments, serve_on_ray  # --ray: the scale engineer's

PLACEMENT = ("vram", "ram", "offload", "quantize", "text_encoder", "text_encoder_token")  # passed to load_pipeline when given


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP: OpenAI images API, jobs, metrics, web page")
    p.add_argument("--model", default="demo", help="pipeline folder, hub id in the local cache, or 'demo' (default)")
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the model's)")
    p.add_argument("--vram", help="device memory budget for the placement planner, e.g. 24GiB (default: detected)")
    p.add_argument("--ram", help="host memory budget for the placement planner (default: detected)")
    p.add_argument("--offload", choices=["model", "blocks", "sequential"], help="offload mode (default: planner's)")
    p.add_argument("--quantize", choices=["int8", "fp8", "nf4"], help="weight quantization (default: planner's)")
    p.add_argument("--text-encoder", metavar="URL", help="encode prompts on a `featherflux` encode server at URL")
    p.add_argument("--text-encoder-token", help="bearer token for the encode server")
    add_ray_arguments(p)  # --ray, --replicas, --autoscale, --gpus-per-replica, --address
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ray:  # replicas of this server on Ray Serve (cli/serve_ray.py)
        return serve_on_ray(args)
    from featherflux.pipeline import load_pipeline

    try:
        from featherflux.serve.api import create_app, run_server
    except ImportError as e:
        raise UserError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'featherflux[serve]'"
        ) from None

    if args.max_queue < 1 or args.max_batch < 1:
        raise UserError("--max-queue and --max-batch must be at least 1")
    loras = {}
    if args.lora_dir is not None:
        if not args.lora_dir.is_dir():
            raise UserError(f"--lora-dir {args.lora_dir} is not a folder")
        loras = {p.stem: p for p in sorted(args.lora_dir.glob("*.safetensors"))}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    placement = {name: getattr(args, name) for name in PLACEMENT if getattr(args, name) is not None}
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, **placement)
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
    )
    print(
        f"featherflux: serving {args.model} on http://{args.host}:{args.port}/ (images in {args.output_dir})",
        flush=True,
    )
    run_server(app, host=args.host, port=args.port)
    return 0
