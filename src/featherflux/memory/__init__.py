"""Running FLUX.2 on modest hardware: planner, placement (offload, block streaming), quantization, embedding cache.

The pipeline touches this package in three places only:
- `place_pipeline(pipe, device, vram=..., offload=..., quantize=..., embed_cache=...)` after loading (on the host);
- `phase(pipe, "dit" | "autoencoder")` around denoising and around encoding references / decoding (the text
  encoder's phase is entered by its own wrapper, only when a prompt really has to be encoded);
- `retry_on_oom(pipe, fn, *args)` around a generation: a device out-of-memory error moves to the next plan.
Loading asks it two things before any weight is read: whether the pipeline will be placed (`needs_placement`) and
whether the chosen plan keeps the weights memory-mapped (`mmap_planned`). This package reads no checkpoint: they
are read by `featherflux.weights`; here components are only placed and shrunk.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import replace

import torch

from featherflux.errors import UserError
from featherflux.memory.embed_cache import CachedPromptEncoder
from featherflux.memory.gguf import GGUFLinear
from featherflux.memory.offload import Placement, apply_placement, fallback
from featherflux.memory.planner import Plan, parse_bytes, plan, plans
from featherflux.memory.quant import Float8Linear, quantize
from featherflux.weights.gguf import format_name

__all__ = [
    "CachedPromptEncoder",
    "Placement",
    "Plan",
    "apply_placement",
    "dit_file_quantization",
    "mmap_planned",
    "needs_placement",
    "parse_bytes",
    "phase",
    "place_pipeline",
    "plan",
    "plans",
    "quantize",
    "require_device",
    "retry_on_oom",
]

log = logging.getLogger("featherflux.memory")


class PlacedPromptEncoder:
    """A prompt encoder whose weights are on the device only while it encodes (the pipeline's placement decides)."""

    def __init__(self, encoder, pipe):
        self.encoder = encoder
        self.pipe = pipe

    def __getattr__(self, name: str):
        return getattr(self.__dict__["encoder"], name)

    def encode(self, prompts, max_sequence_length: int = 512, **kwargs):
        with phase(self.pipe, "text_encoder"):
            return self.encoder.encode(prompts, max_sequence_length, **kwargs)

    def upsample(self, prompts, images=None, temperature: float = 0.15):
        """Caption upsampling with the whole text encoder, placed as the plan places the encoder."""
        placement = getattr(self.pipe, "placement", None)
        carry = placement.carry if placement is not None else None
        return self.encoder.upsample(prompts, images, temperature, carry=carry)


def phase(pipe, name: str):
    placement = getattr(pipe, "placement", None)
    return placement.phase(name) if placement is not None else contextlib.nullcontext()


def needs_placement(device, *, vram=None, offload=None, quantize=None) -> bool:
    """Whether the planner places the pipeline: always on CUDA; on the host only when a budget or mode is asked for."""
    return torch.device(device).type == "cuda" or any(v is not None for v in (vram, offload, quantize))


def _candidate_plans(family, device, vram, ram, offload, quantize, height, width, tensor=1) -> list[Plan] | None:
    """The plans for `device`, best first, or None when nothing is to be planned (CPU without knobs)."""
    if not needs_placement(device, vram=vram, offload=offload, quantize=quantize):
        return None
    if torch.device(device).type != "cuda" and vram is None:
        vram = 1 << 60  # no device budget (the "device" is the host): honour the requested mode only
    return plans(
        family,
        vram,
        ram,
        height=height,
        width=width,
        offload=offload or "auto",
        quantize=quantize or "auto",
        tensor_degrees=(tensor,),
    )


def mmap_planned(family, device, *, vram=None, ram=None, offload=None, quantize=None, height=1024, width=1024) -> bool:
    """Whether the plan `place_pipeline` will choose keeps the weights memory-mapped (the host RAM is too small)."""
    candidates = _candidate_plans(family, device, vram, ram, offload, quantize, height, width)
    return bool(candidates) and candidates[0].mmap


def dit_file_quantization(dit) -> str | None:
    """The quantization a DiT was loaded with from its file: "fp8" (BFL fp8), a GGUF format ("q4_k"...) or None."""
    gguf_bytes = Counter()
    for m in dit.modules():
        if isinstance(m, Float8Linear):
            return "fp8"
        if isinstance(m, GGUFLinear):
            gguf_bytes[m.qtype] += m.weight.numel()
    return format_name(gguf_bytes.most_common(1)[0][0]) if gguf_bytes else None


def require_device(device) -> None:
    """Refuse a CUDA device that is not there before any weights are read."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for, but PyTorch sees no CUDA device here (no GPU, or a CPU-only "
                        "torch build); use --device cpu, or install a CUDA build of torch on a machine with a GPU")


def place_pipeline(
    pipe,
    device,
    *,
    vram=None,
    ram=None,
    offload=None,
    quantize=None,
    embed_cache=None,
    mmap: bool = False,
    height: int = 1024,
    width: int = 1024,
    tensor_parallel: int = 1,
):
    """Plan for `device` (VRAM detected on CUDA unless `vram` is given) and place the pipeline's components.

    `offload` / `quantize` = None let the planner choose; a value fixes that part of the plan. A DiT loaded
    quantized from its file (GGUF, BFL fp8) fixes the quantization. `mmap=True`: the DiT's weights are
    memory-mapped, so streamed blocks are not pinned (that would copy them into RAM). `embed_cache` is a folder
    for the on-disk prompt-embedding cache. `tensor_parallel` = N plans one rank of an N-way tensor-parallel run,
    whose DiT blocks are sliced already. Returns the pipeline (changed in place).
    """
    require_device(device)
    file_quant = dit_file_quantization(pipe.transformer)
    if file_quant and quantize not in (None, file_quant):
        raise UserError(
            f"the transformer was loaded already quantized ({file_quant}) from its file; drop quantize={quantize!r}"
        )
    candidates = _candidate_plans(
        pipe.family, device, vram, ram, offload, quantize or file_quant, height, width, tensor_parallel
    )
    if candidates is not None:
        chosen = candidates[0]
        if not chosen.fits:
            raise UserError(f"{pipe.family.name} does not fit: {chosen.explanation} Try quantize='nf4' or more memory.")
        if mmap and not chosen.mmap:
            chosen = replace(chosen, mmap=True)
        log.info("memory plan: %s", chosen.explanation)
        fallbacks = [replace(p, mmap=p.mmap or mmap) for p in candidates[1:] if p.fits]
        pipe.placement = apply_placement(pipe, chosen, device, fallbacks=fallbacks)
    if pipe.prompt_encoder is not None and not isinstance(pipe.prompt_encoder, PlacedPromptEncoder):
        pipe.prompt_encoder = PlacedPromptEncoder(pipe.prompt_encoder, pipe)
    if embed_cache is not None and pipe.prompt_encoder is not None:
        pipe.prompt_encoder = CachedPromptEncoder(pipe.prompt_encoder, embed_cache)
    return pipe


def retry_on_oom(pipe, fn, *args):
    """Call `fn(*args)`; on a device out-of-memory error, apply the next plan with a smaller peak and retry."""
    while True:
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            placement = getattr(pipe, "placement", None)
            nxt = fallback(pipe, placement) if placement is not None else None
            if nxt is None:
                raise UserError(
                    "out of device memory, and no smaller plan is left; try quantize='nf4', a smaller "
                    "image, or offload='sequential'"
                ) from None
            pipe.placement = nxt
