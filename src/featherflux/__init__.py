"""featherflux: run, serve and fine-tune FLUX.2 image models on the hardware people actually have."""

from featherflux.model.config import FAMILIES, AutoEncoderConfig, DiTConfig, FamilyConfig, TextEncoderConfig, get_family

__all__ = [
    "FAMILIES",
    "AutoEncoderConfig",
    "DiTConfig",
    "FamilyConfig",
    "TextEncoderConfig",
    "get_family",
]
