"""Checkpoint loading and saving: BFL single files and diffusers-layout folders, both ways.

`load_transformer` / `save_transformer` live in `weights.transformer`, `load_autoencoder` / `save_autoencoder` in
`weights.autoencoder`; the generic safetensors machinery (`open_checkpoint`, `materialize`) in `weights.io`.
They are imported on first use so that `import featherflux` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_transformer": "featherflux.weights.transformer",
    "save_transformer": "featherflux.weights.transformer",
    "load_autoencoder": "featherflux.weights.autoencoder",
    "save_autoencoder": "featherflux.weights.autoencoder",
    "open_checkpoint": "featherflux.weights.io",
    "materialize": "featherflux.weights.io",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featherflux.weights' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
