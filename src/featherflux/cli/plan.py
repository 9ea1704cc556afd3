"""`featherflux plan MODEL --vram 24 [--ram 64] [--json]`: print the placement the planner would use, and for a hub
repo id how much a run would download."""

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
    p.add_argument("--all", action="store_true", help="also list the other candidate plans")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--revision", help="with a hub repo id: the revision whose download size is told")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    family, file_quantization = resolve_family(args.model)
    candidates = plans(
        family,
        args.vram,
        args.ram,
        height=args.height,
        width=args.width,
        offload=args.offload,
        quantize=args.quantize,
        file_quantization=file_quantization,
    )
    best = candidates[0]
    download = _download(args.model, args.revision)
    if args.json:
        print(json.dumps(json.loads(best.to_json()) | download, indent=2))
        return 0 if best.fits else 1
    print(best.explanation)
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
                f"  offload={p.offload or 'none':10} quantize={p.quantize or 'bf16':5} fits={p.fits!s:5} "
                f"peak={p.peak_vram_gib:5.1f} GiB  {p.seconds_per_step:6.2f} s/step  {p.seconds_per_image:7.1f} s/image"
            )
    return 0 if best.fits else 1


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
