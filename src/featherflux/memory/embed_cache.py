"""A persistent on-disk cache of prompt embeddings, so a repeated prompt never wakes the text encoder.

`CachedPromptEncoder` has the `PromptEncoder` interface (`encode`, `model_id`, `family`) and wraps any encoder.
Each prompt's embedding is one safetensors file named by a SHA-256 of everything that changes the result: model
id, family, prompt, sequence length and stacked layers (plus a format version). Files are written to a temporary
name in the cache folder and moved into place, so concurrent writers and crashes never leave a torn file; an
unreadable file counts as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from featherflux.atomic import atomic_write

FORMAT_VERSION = 1


class CachedPromptEncoder:
    def __init__(self, encoder, directory: str | os.PathLike):
        self.encoder = encoder
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    @property
    def family(self) -> str:
        return self.encoder.family

    def __getattr__(self, name: str):  # everything else (e.g. `model`, `to`) is the wrapped encoder's
        return getattr(self.__dict__["encoder"], name)

    def path(self, prompt: str, max_sequence_length: int, out_layers: tuple[int, ...] | None) -> Path:
        key = {
            "v": FORMAT_VERSION,
            "model_id": self.model_id,
            "family": self.family,
            "prompt": prompt,
            "max_sequence_length": max_sequence_length,
            "out_layers": list(out_layers) if out_layers else None,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{digest}.safetensors"

    def _load(self, path: Path) -> Tensor | None:
        try:
            return load_file(path)["prompt_embeds"]
        except (FileNotFoundError, SafetensorError, KeyError, OSError):
            return None

    def _save(self, path: Path, embeds: Tensor) -> None:
        atomic_write(path, lambda tmp: save_file({"prompt_embeds": embeds.contiguous().cpu()}, tmp))

    def encode(self, prompts: list[str], max_sequence_length: int = 512, **kwargs) -> Tensor:
        out_layers = kwargs.get("out_layers")
        paths = [self.path(p, max_sequence_length, out_layers) for p in prompts]
        found = [self._load(p) for p in paths]
        missing = [i for i, t in enumerate(found) if t is None]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.encoder.encode([prompts[i] for i in missing], max_sequence_length, **kwargs)
            for row, i in enumerate(missing):
                found[i] = fresh[row]
                self._save(paths[i], fresh[row])
        device = next((t.device for t in found if t.device.type != "cpu"), torch.device("cpu"))
        return torch.stack([t.to(device) for t in found])
