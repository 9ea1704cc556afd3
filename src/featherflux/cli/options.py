"""Flags that several commands share, spelt and parsed once: device, dtype, memory placement, remote text encoder.

`--dtype` takes both spellings people use (`bf16` / `bfloat16`, `fp16` / `float16`, `fp32` / `float32`).
`pipeline_options(args)` turns whichever of these flags a command has into `load_pipeline` keyword arguments.
"""

from __future__ import annotations

import argparse

import torch

from featherflux.memory.planner import QUANTIZE_MODES as PLANNER_QUANTIZE_MODES
from featherflux.model.attention import BACKENDS as ATTENTION_BACKENDS
from featherflux.parallel import PARALLEL_MODES

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
OFFLOAD_MODES = ("model", "blocks", "sequential")
QUANTIZE_MODES = tuple(mode for mode in PLANNER_QUANTIZE_MODES if mode)  # "none" forbids quantization
# load_pipeline keyword arguments that a flag of the same name (dashes for underscores) sets when given
PIPELINE_FLAGS = (
    "vram", "ram", "offload", "quantize", "text_encoder", "text_encoder_token", "download", "revision", "attention",
    "compile", "parallel", "parallel_degree",
)


def dtype(value: str) -> torch.dtype:
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}") from None


def dtype_name(value: torch.dtype | None) -> str | None:
    """ "bfloat16" for torch.bfloat16: how a dtype travels in settings that must stay plain data (Ray)."""
    return None if value is None else str(value).removeprefix("torch.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device(p: argparse.ArgumentParser, *, dtype_help: str = "weight dtype (default: the checkpoint's)") -> None:
    p.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", type=dtype, metavar="{bf16,fp16,fp32}", help=dtype_help)


def add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attention",
        choices=("auto", *ATTENTION_BACKENDS),
        help="the DiT's attention kernel (default: auto, the fastest this device has; `featherflux info --backends`)",
    )


def add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        type=compile_mode,
        metavar="max",
        help="compile the DiT's blocks (the first image of each size pays for it); --compile=max also autotunes and "
        "uses CUDA graphs",
    )


def add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parallel",
        choices=PARALLEL_MODES,
        help="split each image across the processes torchrun started: ulysses (heads), ring (K/V ring), usp (both), "
        "cfg (the two guidance passes), or cfg+ one of them; rank 0 writes the files",
    )
    p.add_argument("--parallel-degree", type=int, metavar="N", help="with --parallel usp: its Ulysses degree")


def compile_mode(value: str) -> str:
    if value != "max":
        raise argparse.ArgumentTypeError(f"--compile takes no value or 'max', got {value!r} (write --compile=max)")
    return value


def add_placement(p: argparse.ArgumentParser, *, quantize_modes: tuple[str, ...] = QUANTIZE_MODES) -> None:
    """The memory planner's knobs (see `featherflux plan`)."""
    p.add_argument("--vram", help="device memory budget, e.g. 24 or 24GiB (default: the CUDA device's)")
    p.add_argument("--ram", help="host memory budget (default: this machine's)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, help="fix the placement (default: planned)")
    p.add_argument(
        "--quantize",
        choices=quantize_modes,
        help="fix the quantization; none keeps the checkpoint's precision (default: planned, quality first)",
    )


def add_text_encoder(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-encoder",
        metavar="URL",
        help="encode prompts on a `featherflux encode-server` at URL instead of loading the text encoder",
    )
    p.add_argument(
        "--text-encoder-token",
        help="bearer token for the encode server (default: $FEATHERFLUX_TEXT_ENCODER_TOKEN)",
    )


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="fetch a hub repo id's missing files (only those this run needs) into the Hugging Face cache",
    )
    p.add_argument("--revision", help="the hub revision (branch, tag or commit) of --model; default: main")


def pipeline_options(args: argparse.Namespace) -> dict:
    """`load_pipeline` keyword arguments from the shared flags this command has and the user gave."""
    options = {"device": args.device, "dtype": args.dtype}
    options |= {name: getattr(args, name) for name in PIPELINE_FLAGS if getattr(args, name, None) is not None}
    return options
