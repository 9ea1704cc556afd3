"""`featherflux encode-server --model PATH_OR_ID`: serve a pipeline's text encoder over HTTP (see
`featherflux.serve.encoder_service`); generation workers use it with `generate --text-encoder URL`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featherflux.cli.options import add_device, add_download
from featherflux.errors import MissingExtraError, UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("encode-server", help="serve a model's prompt encoder over HTTP for remote pipelines")
    p.add_argument("--model", required=True, help="pipeline folder, hub repo id, or 'demo'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--token-file", type=Path, help="file holding the bearer token clients must send (no auth without)")
    add_device(p)
    add_download(p)
    p.add_argument("--cache-mb", type=int, default=1024, help="embedding cache size in MiB (0 turns it off)")
    p.add_argument("--max-batch", type=int, default=32, help="most prompts encoded in one encoder call")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the token (for a Prometheus scraper); by default it needs it")
    p.set_defaults(func=run)


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read --token-file {path}: {e.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise UserError(f"--token-file {path} must hold one token with no spaces, e.g. from `openssl rand -hex 32`")
    return token


def run(args: argparse.Namespace) -> int:
    try:  # the serve extra (fastapi, uvicorn) is optional: imported only to serve
        from featherflux.serve.encoder_service import load_pipeline_prompt_encoder, run_encoder_server
    except ImportError:
        raise MissingExtraError("featherflux encode-server", "serve") from None

    if args.cache_mb < 0 or args.max_batch < 1:
        raise UserError("--cache-mb must be >= 0 and --max-batch >= 1")
    token = read_token(args.token_file) if args.token_file else None
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"featherflux: warning: serving on {args.host} without --token-file; anyone who can reach it may use it",
            file=sys.stderr,
        )
    encoder = load_pipeline_prompt_encoder(
        args.model, device=args.device, dtype=args.dtype, download=bool(args.download), revision=args.revision
    )
    print(
        f"featherflux: encoding for {encoder.family} ({encoder.model_id}) on http://{args.host}:{args.port}/v1/encode",
        file=sys.stderr,
    )
    run_encoder_server(
        encoder,
        host=args.host,
        port=args.port,
        token=token,
        cache_bytes=args.cache_mb << 20,
        max_batch_prompts=args.max_batch,
        metrics_public=args.metrics_public,
    )
    return 0
