"""The DiT of a family with random (or no) weights, made directly on its device: for benchmarks and tests that need
a real-size model but no checkpoint (speed does not depend on the values)."""

from __future__ import annotations

import contextlib

import torch

from featherflux.errors import UserError
from featherflux.model.config import FAMILIES, DiTConfig, FamilyConfig
from featherflux.model.dit import Flux2

INITS = ("random", "empty")


def build_transformer(
    family: str | FamilyConfig | DiTConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    init: str = "random",
    seed: int = 0,
) -> Flux2:
    """The `Flux2` of a named family (or a FamilyConfig / DiTConfig), frozen, in eval mode, built on `device` in
    `dtype` (None: float32). `init="random"`: PyTorch's default initialisation from `seed` (the global RNG is left as
    it was); `init="empty"`: memory left uninitialised, the fastest way to get a model of the right size. On
    `device="meta"` no memory is used at all."""
    if init not in INITS:
        raise UserError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
    if isinstance(family, str):
        if family not in FAMILIES:
            raise UserError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
        family = FAMILIES[family]
    config = family.dit if isinstance(family, FamilyConfig) else family
    device, dtype = torch.device(device), dtype or torch.float32
    with default_dtype(dtype):  # made in `dtype`: a 32B model never exists in float32 on the way
        if init == "empty" or device.type == "meta":
            with torch.device("meta"):
                model = Flux2(config)
            model = model if device.type == "meta" else model.to_empty(device=device)
        else:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
                torch.manual_seed(seed)
                model = Flux2(config)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules made inside are made in `dtype` (no float32 copy on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
