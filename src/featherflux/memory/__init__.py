"""Running FLUX.2 on modest hardware: planner, placement (offload, block streaming), quantization, embedding cache.

The pipeline touches this package in three places only:
- `place_pipeline(pipe, device, vram=..., offload=..., quantize=..., embed_cache=...)` after loading (on the host);
- `phase(pipe, "dit" | "autoencoder")` around denoising and around encoding references / decoding (the text
  encoder's phase is entered by its own wrapper, only when a prompt really has to be encoded);
- `retry_on_oom(pipe, fn, *args)` around a generation: a device out-of-memory error moves to the next plan.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from featherflux.errors import UserError
from featherflux.memory.embed_cache import CachedPromptEncoder
from featherflux.memory.offload import Placement, apply_placement, fallback
from featherflux.memory.planner import Plan, parse_bytes, plan, plans
from featherflux.memory.quant import quantize

__all__ = [
    "CachedPromptEncoder",
    "Placement",
    "Plan",
    "apply_placement",
    "parse_bytes",
    "phase",
    "place_pipeline",
    "plan",
    "plans",
    "quantize",
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


def phase(pipe, name: str):
    placement = getattr(pipe, "placement", None)
    return placement.phase(name) if placement is not None else contextlib.nullcontext()


def place_pipeline(
    pipe,
    device,
    *,
    vram=None,
    ram=None,
    offload=None,
    quantize=None,
    embed_cache=None,
    height: int = 1024,
    width: int = 1024,
):
    """Plan for `device` (VRAM detected on CUDA unless `vram` is given) and place the pipeline's components.

    `offload` / `quantize` = None let the planner choose; a value fixes that part of the plan. `embed_cache` is a
    folder for the on-disk prompt-embedding cache. Returns the pipeline (changed in place).
    """
    device = torch.device(device)
    if device.type == "cuda" or vram is not None or offload or quantize:
        if device.type != "cuda" and vram is None:
            vram = 1 << 60  # no device budget (the "device" is the host): honour the requested mode only
        candidates = plans(
            pipe.family, vram, ram, height=height, width=width, offload=offload or "auto", quantize=quantize or "auto"
        )
        chosen = candidates[0]
        if not chosen.fits:
            raise UserError(f"{pipe.family.name} does not fit: {chosen.explanation} Try quantize='nf4' or more memory.")
        log.info("memory plan: %s", chosen.explanation)
        pipe.placement = apply_placement(pipe, chosen, device, fallbacks=[p for p in candidates[1:] if p.fits])
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
