"""`featherflux generate PROMPT [--model M] [--image REF]... [--init IMAGE [--mask MASK] [--strength S]] [-o OUT.png]`:
text to image, editing from references, or inpainting a picture.

Each PNG carries what reproduces it (prompt, model, seed, size, steps, guidance, references, LoRAs) in text chunks
(`featherflux.request.ImageParameters`); with `--num-images K`, image i is seeded `seed + i`, so any one of them can
be re-made alone with its own seed.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

import torch

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
from featherflux.errors import UserError
from featherflux.images import open_reference_image, save_png
from featherflux.loading import demo_folder
from featherflux.parallel import is_main_process
from featherflux.pipeline import load_pipeline
from featherflux.request import (
    CACHE_METHODS,
    DEFAULT_CACHE_THRESHOLD,
    MAX_REFERENCES,
    MIN_SIDE,
    GenerationRequest,
    floor_size,
)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from a prompt (and optional reference images)")
    p.add_argument("prompt")
    p.add_argument("--model", help="pipeline folder, hub repo id, or 'demo' (default: demo)")
    p.add_argument("--image", action="append", default=[], metavar="REF",
                   help="reference image to edit from; repeat for up to 10")
    p.add_argument("--init", metavar="IMAGE", help="inpaint this picture (its size is the output's by default)")
    p.add_argument("--mask", metavar="MASK",
                   help="with --init: white pixels are repainted, black kept (default: repaint all, image-to-image)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="with --init: how far to move from the picture, 0..1 (default 0.8; 1 starts from noise)")
    p.add_argument("--upsample", nargs="?", type=float, const=0.15, metavar="TEMPERATURE",
                   help="dev: let the text encoder rewrite the prompt first (caption upsampling; default 0.15); both "
                        "prompts go into the PNG")
    p.add_argument("--width", type=int, help="default: the first reference's width, else the model's default")
    p.add_argument("--height", type=int, help="default: the first reference's height, else the model's default")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--cache", choices=CACHE_METHODS, help="step caching: skip the DiT's later blocks on steps that "
                   "change little (faster, slightly different picture)")
    p.add_argument("--cache-threshold", type=float, metavar="X",
                   help=f"with --cache: the relative change below which a step is skipped "
                   f"(default {DEFAULT_CACHE_THRESHOLD})")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, stored in the PNG)")
    p.add_argument("--num-images", type=int, default=1, metavar="K")
    p.add_argument("-o", "--output", help="output PNG (default: featherflux-SEED.png); K > 1 adds -0, -1, ...")
    add_device(p)
    add_attention(p)
    add_compile(p)
    add_parallel(p)
    add_download(p)
    add_text_encoder(p)
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   type=parse_lora_arg, help="apply a LoRA file (any common format) at SCALE (default 1); repeatable")
    add_placement(p)
    p.add_argument("--embed-cache", metavar="DIR",
                   help="keep prompt embeddings on disk; a repeated prompt skips the text encoder")
    p.add_argument("--transformer", metavar="FILE",
                   help="take the DiT from FILE instead of the model's transformer/: a ComfyUI-GGUF .gguf, a BFL fp8 "
                        ".safetensors or a plain BFL checkpoint of the same family")
    p.add_argument("--mmap", action="store_true", default=None,
                   help="keep the DiT weights memory-mapped from disk (little RAM; default: when the plan says so)")
    p.set_defaults(func=run)


def parse_lora_arg(value: str) -> tuple[str, float]:
    """FILE or FILE:SCALE; a colon that is not followed by a number belongs to the path."""
    path, _, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def output_paths(output: str | None, seed: int, count: int) -> list[Path]:
    path = Path(output or f"featherflux-{seed}.png")
    if path.suffix.lower() != ".png":
        raise UserError(f"output {path} must end in .png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _note(message, category, filename, lineno, file=None, line=None):
    print(f"featherflux: note: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    # bad numbers, sizes and reference counts fail before the model loads (a side not given is only known after)
    if args.num_images < 1 or (args.steps is not None and args.steps < 1):
        raise UserError(f"--num-images and --steps must be >= 1, got {args.num_images} and {args.steps}")
    if len(args.image) > MAX_REFERENCES:
        raise UserError(f"{len(args.image)} --image references given; at most {MAX_REFERENCES} are supported")
    if args.width is not None or args.height is not None:
        floor_size(MIN_SIDE if args.height is None else args.height, MIN_SIDE if args.width is None else args.width)
    if args.init is None and args.mask is not None:
        raise UserError("--mask marks what to repaint in the --init picture; pass --init IMAGE too")
    if not 0 <= args.strength <= 1:
        raise UserError(f"--strength must be between 0 and 1, got {args.strength}")
    model = args.model
    if model is None:
        if not (demo_folder() / "model_index.json").is_file():
            raise UserError("no --model given and the demo model is not installed; pass --model PATH_OR_REPO_ID")
        model = "demo"
    seed = random.randrange(2**32) if args.seed is None else args.seed
    paths = output_paths(args.output, seed, args.num_images)
    references = [open_reference_image(p) for p in args.image]  # bad files fail before the model loads
    init = open_reference_image(args.init, what="--init picture") if args.init else None
    mask = open_reference_image(args.mask, what="--mask") if args.mask else None
    with warnings.catch_warnings():
        warnings.showwarning = _note
        warnings.simplefilter("default", UserWarning)
        try:
            pipe = load_pipeline(model, embed_cache=args.embed_cache, transformer=args.transformer, mmap=args.mmap,
                                 **pipeline_options(args))
            if pipe.placement is not None and is_main_process():
                print(f"featherflux: memory plan: {pipe.placement.plan.explanation}", file=sys.stderr)
            for lora_path, lora_scale in args.lora:
                pipe.load_lora(lora_path, scale=lora_scale)
            prompt, upsampled = args.prompt, None
            if args.upsample is not None:  # seeded, so the PNG's seed re-makes the same text
                torch.manual_seed(seed)
                pictures = [init] if init is not None else []
                pictures += references
                (upsampled,) = pipe.upsample_prompt(args.prompt, [pictures] if pictures else None, args.upsample)
                prompt = upsampled
                if is_main_process():
                    print(f"featherflux: upsampled prompt: {upsampled}", file=sys.stderr)
            call = {
                "width": args.width,
                "height": args.height,
                "num_inference_steps": args.steps,
                "guidance_scale": args.guidance,
                "generator": [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.num_images)],
                "num_images_per_prompt": args.num_images,
                "cache": args.cache,
                "cache_threshold": args.cache_threshold,
                "show_progress": is_main_process(),
            }
            if init is None:
                request = pipe.request(prompt, image=references or None, **call)
            else:
                request = GenerationRequest.for_inpaint(
                    pipe.family, prompt=prompt, image=init, mask_image=mask, image_reference=references or None,
                    strength=args.strength, **call,
                )
            images = pipe.generate(request)
            if not is_main_process():  # every rank made the same images; one writes them
                return 0
            for i, (image, path) in enumerate(zip(images, paths)):
                parameters = request.image_parameters(
                    prompt=args.prompt,
                    model=str(model),
                    seed=seed + i,
                    references=args.image,
                    loras=[f"{p}:{w}" for p, w in args.lora],
                    init=args.init,
                    mask=args.mask,
                    upsampled=upsampled,
                )
                save_png(image, path, parameters.as_dict())
                print(path)
        except UserError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # one line for the user, never a traceback
            raise UserError(f"{type(e).__name__}: {e}") from None
    return 0
