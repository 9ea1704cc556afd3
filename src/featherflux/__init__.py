"""featherflux: run, serve and fine-tune FLUX.2 image models on the hardware people actually have."""

import importlib

from featherflux.model.config import FAMILIES, AutoEncoderConfig, DiTConfig, FamilyConfig, TextEncoderConfig, get_family

__all__ = [
    "FAMILIES",
    "AutoEncoderConfig",
    "DiTConfig",
    "FamilyConfig",
    "TextEncoderConfig",
    "get_family",
    "load_autoencoder",
    "load_pipeline",
    "load_transformer",
]

_LAZY = {  # these pull in torch and the model code; imported on first use so `import featherflux` stays light
    "load_transformer": "featherflux.weights",
    "load_autoencoder": "featherflux.weights",
    "load_pipeline": "featherflux.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featherflux' has no attribute {name!r}")
