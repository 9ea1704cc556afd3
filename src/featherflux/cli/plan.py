"""`featherflux plan MODEL --vram 24 [--ram 64] [--gpus 4] [--json]`: print the placement the planner would use (with
--gpus, tensor parallelism over that many cards weighed against one card), and for a hub repo id how much a run
would download."""

from __future__ import annotations

import argparse
import json
import sys

from featherflux.cli.options import QUANTIZE_MODES
from featherflux.errors import UserError
from featherflux.loading import resolve_family
from featherflux.loading.hub import download_size, is_repo_id
from featherflux.memory.planner import plans


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="show how a model would be placed on a device of a given size")
    p.add_argument("model", help="family name (flux.2-dev, klein-4b, klein-9b), hub id, folder, .safetensors or .gguf")
    p.add_argument("--vram", help="device memory, e.g. 24 or 24GiB (default: the CUDA device's)")
    p.add_argument("--ram", help="host memory, e.g. 64 or 64GiB (default: this machine's)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--offload", choices=["model", "blocks", "sequential"], default="auto", help="fix the placement")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="auto", help="fix the quantization (none: forbid it)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="N cards of --vram each: also weigh tensor parallelism over all N against one card")
    p.add_argument("--all", action="store_true", help="also list the other candidate plans")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--revision", help="with a hub repo id: the revision whose download size is told")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    family, file_quantization = resolve_family(args.model)
    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    candidates = plans(
        family,
        args.vram,
        args.ram,
        height=args.height,
        width=args.width,
        offload=args.offload,
        quantize=args.quantize,
        file_quantization=file_quantization,
        tensor_degrees=(1, args.gpus) if args.gpus > 1 else (1,),
    )
    best = candidates[0]
    download = _download(args.model, args.revision)
    if args.json:
        print(json.dumps(json.loads(best.to_json()) | download, indent=2))
        return 0 if best.fits else 1
    print(best.explanation)
    if args.gpus > 1:
        print(_versus(best, candidates, args.gpus))
    if download:
        gib = {k: v / 2**30 for k, v in download.items()}
        print(
            f"Download: {gib['download_bytes']:.1f} GiB of weights and configs for this run, "
            f"{gib['download_missing_bytes']:.1f} GiB of it not in the local cache yet."
        )
    if args.all:
        print("\ncandidates (best first):")
        for p in candidates:
            print(
                f"  gpus={p.tensor_parallel} offload={p.offload or 'none':10} quantize={p.quantize or 'bf16':5} fits={p.fits!s:5} "
                f"peak={p.peak_vram_gib:5.1f} GiB  {p.seconds_per_step:6.2f} s/step  {p.seconds_per_image:7.1f} s/image"
            )
    return 0 if best.fits else 1


def _versus(best, candidates, gpus: int) -> str:
    """One line on the best plan of the other kind (one card, or tensor parallel over all of them)."""
    other = next((p for p in candidates if p.fits and (p.tensor_parallel > 1) != (best.tensor_parallel > 1)), None)
    chosen = f"tensor parallel over {gpus} GPUs" if best.tensor_parallel > 1 else "one GPU"
    if other is None:
        alternative = "one GPU" if best.tensor_parallel > 1 else f"tensor parallelism over {gpus} GPUs"
        return f"Picks {chosen}: nothing fits with {alternative}."
    return (
        f"Picks {chosen} ({best.quantize or 'bf16'}, {best.seconds_per_image:.1f} s/image) over "
        f"{'one GPU' if other.tensor_parallel == 1 else f'tensor parallelism over {gpus} GPUs'} "
        f"({other.quantize or 'bf16'}, DiT {other.dit}, {other.seconds_per_image:.1f} s/image); run it with "
        + (
            f"torchrun --nproc-per-node {gpus} -m featherflux generate ... --parallel tensor"
            if best.tensor_parallel > 1
            else "featherflux generate ..."
        )
        + "."
    )


def _download(model: str, revision: str | None) -> dict:
    """What a run of a hub repo id would fetch; empty for anything else, or when the hub cannot be asked."""
    if not is_repo_id(model):
        return {}
    try:
        total, missing = download_size(model, revision=revision)
    except UserError as e:
        print(f"featherflux: note: download size unknown: {e}", file=sys.stderr)
        return {}
    return {"download_bytes": total, "download_missing_bytes": missing}
