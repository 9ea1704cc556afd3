"""`featherflux train-lora --model PATH_OR_ID --data DIR --output DIR [--steps N] [options]`: fine-tune a LoRA (or the
whole DiT with --mode full) on a folder of images with same-name .txt captions."""

from __future__ import annotations

import argparse
from pathlib import Path

from featherflux.cli.options import add_attention, add_device, add_download, add_text_encoder, pipeline_options
from featherflux.errors import UserError
from featherflux.lora.finetune import FinetuneSetup, finetune
from featherflux.lora.train import TrainConfig
from featherflux.pipeline import load_pipeline


def register(subparsers) -> None:
    p = subparsers.add_parser("train-lora", help="fine-tune a LoRA (or the full DiT) on images with .txt captions")
    p.add_argument("--model", required=True, help="pipeline folder, hub repo id, or demo")
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions")
    p.add_argument("--output", required=True, help="folder for checkpoints, logs, validation images and the LoRA")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--learning-rate", "--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=512, help="training pixels ~ resolution^2 per image")
    p.add_argument("--no-buckets", action="store_true", help="centre-crop everything square instead of bucketing")
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--timestep-sampling", choices=["shift", "logit_normal", "uniform"], default="shift")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance fed to guidance-distilled models")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quantize", choices=["int8", "nf4"], default=None, help="frozen quantized base (QLoRA)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--validate-every", type=int, default=0)
    p.add_argument("--validation-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None)
    add_device(p, dtype_help="base weight dtype (default: the checkpoint's)")
    add_attention(p)
    add_download(p)
    add_text_encoder(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup = FinetuneSetup(
        data=args.data,
        output=args.output,
        resolution=args.resolution,
        buckets=not args.no_buckets,
        max_sequence_length=args.max_sequence_length,
        quantize=args.quantize,
        validation_prompt=args.validation_prompt,
    )
    config = TrainConfig(
        mode=args.mode,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else float(args.rank),
        timestep_sampling=args.timestep_sampling,
        caption_dropout=args.caption_dropout,
        guidance=args.guidance,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        seed=args.seed,
    )
    if not Path(args.data).is_dir():  # before minutes of loading
        raise UserError(f"training data folder not found: {args.data}")
    try:
        pipe = load_pipeline(args.model, **pipeline_options(args))
        result = finetune(pipe, setup, config)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # one line for the user, never a traceback
        raise UserError(f"{type(e).__name__}: {e}") from None
    for path in result.outputs:
        print(path)
    return 0
