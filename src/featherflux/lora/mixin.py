"""The LoRA methods of `Flux2Pipeline`, named as diffusers names them; each is one call on the pipeline's DiT."""

from __future__ import annotations

from pathlib import Path

from featherflux.lora import load


class LoRAMixin:
    """For a class with a `transformer` (the native FLUX.2 DiT)."""

    def load_lora(self, path: str | Path, name: str | None = None, scale: float = 1.0) -> str:
        """Add a LoRA/LoKr file (diffusers, BFL/ComfyUI, kohya or LyCORIS keys); returns its name."""
        return load.load_lora(self.transformer, path, name=name, scale=scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        load.set_lora_scale(self.transformer, name, scale)

    def set_loras(self, wanted: dict[str, tuple[str | Path, float]]) -> None:
        """Make exactly `wanted` = {name: (path, scale)} active; other loaded adapters stay cached at scale 0."""
        load.set_loras(self.transformer, wanted)

    def fuse_lora(self) -> None:
        load.fuse_lora(self.transformer)

    def unfuse_lora(self) -> None:
        load.unfuse_lora(self.transformer)

    def unload_lora(self, name: str | None = None) -> None:
        load.unload_lora(self.transformer, name)
