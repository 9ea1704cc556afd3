"""Every on-disk checkpoint format: diffusers folders and BFL single files both ways, GGUF and BFL fp8 readers.

`load_transformer` / `save_transformer` live in `weights.transformer`, `load_autoencoder` / `save_autoencoder` in
`weights.autoencoder`, the generic safetensors machinery (`open_checkpoint`, `materialize`, headers, memory maps) in
`weights.io`, the quantized readers in `weights.gguf` and `weights.fp8`.
"""

from featherflux.weights.autoencoder import load_autoencoder, save_autoencoder
from featherflux.weights.io import materialize, open_checkpoint
from featherflux.weights.transformer import load_transformer, save_transformer

__all__ = [
    "load_autoencoder",
    "load_transformer",
    "materialize",
    "open_checkpoint",
    "save_autoencoder",
    "save_transformer",
]
