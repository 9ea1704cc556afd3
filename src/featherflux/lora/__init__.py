"""LoRA/LoKr loading in every common FLUX.2 format, stacking, fuse/unfuse, and our own trainer (`lora.train`)."""

from featherflux.lora.load import (
    fuse_lora,
    load_lora,
    lora_names,
    set_lora_scale,
    set_loras,
    unfuse_lora,
    unload_lora,
)

__all__ = ["fuse_lora", "load_lora", "lora_names", "set_lora_scale", "set_loras", "unfuse_lora", "unload_lora"]
