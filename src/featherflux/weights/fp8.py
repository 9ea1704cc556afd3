"""BFL's fp8 checkpoints (e.g. FLUX.2-klein-4b-fp8): float8_e4m3fn Linear weights, each with a `weight_scale`.

A quantized Linear `x` is stored as `x.weight` (float8_e4m3fn) and `x.weight_scale` (one fp32 scale per output
row, or one for the whole tensor); `x.input_scale` is for fp8 activations, which weight-only compute does not
need. Everything else is an ordinary tensor under BFL's names. The DiT is built from it by `featherflux.loading`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from featherflux.weights.io import LazyTensor, mmap_safetensors, open_checkpoint
from featherflux.weights.transformer import strip_bfl_prefix


def is_bfl_fp8(header: dict[str, dict]) -> bool:
    """Whether a safetensors header (see `weights.io.safetensors_header`) is one of BFL's fp8 checkpoints."""
    return any(k.endswith(".weight_scale") for k in header) or any(v["dtype"] == "F8_E4M3" for v in header.values())


@dataclass
class Fp8Checkpoint:
    tensors: dict[str, torch.Tensor | LazyTensor]  # native name -> tensor, scales excluded
    scales: dict[str, torch.Tensor | LazyTensor]  # module name of each fp8 Linear -> its weight scale (per row, or one)


def read_bfl_fp8(path: str | os.PathLike, *, mmap: bool = False) -> Fp8Checkpoint:
    """The tensors of a BFL fp8 file under native names, read one at a time when loaded (`LazyTensor`s), or with
    `mmap=True` views of a private map of the file."""
    stored = mmap_safetensors(path) if mmap else open_checkpoint(path).lazy()
    stored = strip_bfl_prefix(stored)
    scales = {k.removesuffix(".weight_scale"): v for k, v in stored.items() if k.endswith(".weight_scale")}
    tensors = {k: v for k, v in stored.items() if not k.endswith((".weight_scale", ".input_scale"))}
    return Fp8Checkpoint(tensors, scales)
