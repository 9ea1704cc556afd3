"""Regional compilation of the DiT: `torch.compile` on the repeated blocks, not on the whole model.

- One graph per block kind (double-stream, single-stream), reused by every block of that kind: the blocks share
  their code and torch passes parameters as graph inputs, so compile time does not grow with depth (dev has 56
  blocks and compiles two graphs).
- Everything between the blocks (embedders, modulation, RoPE tables, the step cache's decision) stays eager; it
  runs once per step and costs nothing next to the blocks.
- Shapes are static on the first size; a second size recompiles once with dynamic shapes, after which any size
  reuses that graph. The steps of one size never recompile (tested with torch's recompile counter).
- "max" asks Inductor to autotune its kernels and, on CUDA, to replay the blocks as CUDA graphs.
- A device whose compiler cannot run (no C++ compiler on CPU, no Triton or too old a GPU on CUDA) gets a warning
  and stays eager; so does a compile that fails on the first call (see `Flux2Pipeline._generate`).
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings

import torch
from torch import nn

from featherflux.errors import UserError

COMPILE_MODES = (True, "max")  # and False/None: eager
COMPILE_FAILURES = (torch._dynamo.exc.BackendCompilerFailed,)  # Inductor's errors derive from it


def check_mode(compile: bool | str | None) -> bool | str:
    """False (eager), True or "max"; anything else is the user's mistake."""
    if compile in (None, False):
        return False
    if compile is True or compile == "max":
        return compile
    raise UserError(f"unknown compile value {compile!r}; use False, True or 'max'")


def why_not(device: str | torch.device) -> str | None:
    """Why Inductor cannot compile for `device` here, or None."""
    device = torch.device(device)
    if device.type == "cpu":
        compiler = torch._inductor.config.cpp.cxx[-1]
        if shutil.which(compiler) is None:
            return f"Inductor needs a C++ compiler on CPU ({compiler} is not on PATH; install g++)"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Inductor needs the triton package on CUDA (pip install triton)"
        if torch.cuda.get_device_capability(device) < (7, 0):
            return "Triton needs compute capability 7.0 or newer"
    return None


def inductor_mode(compile: bool | str, device: str | torch.device) -> str | None:
    if compile != "max":
        return None
    return "max-autotune" if torch.device(device).type == "cuda" else "max-autotune-no-cudagraphs"


def compile_blocks(model: nn.Module, compile: bool | str, device: str | torch.device) -> bool:
    """Compile every repeated block of `model` (a `Flux2`) in place; False (with a warning) when this device cannot.
    Call before weight streaming wraps the blocks: the wrappers then run the compiled blocks."""
    reason = why_not(device)
    if reason is not None:
        warnings.warn(f"compile={compile!r}: {reason}; running eagerly", stacklevel=3)
        return False
    mode = inductor_mode(compile, device)
    for block in model.repeated_blocks():
        block.compile(mode=mode)
    return True


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager, after a compile failed on its first call."""
    for block in model.repeated_blocks():
        block._compiled_call_impl = None  # what nn.Module.compile set; None makes __call__ run the eager forward
