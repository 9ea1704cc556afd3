"""Training data: a folder of images with same-name `.txt` captions -> a `CachedDataset` of latents and embeddings.

Images are resized to cover an aspect-ratio bucket of about `resolution`^2 pixels (sides multiples of the latent
grid) and centre-cropped. Everything is encoded once, up front, so the text encoder (possibly the remote service)
and the VAE encoder can be freed before training starts. Problems are counted and reported, never silent: images
without a caption or that cannot be read are skipped with a summary; a folder with nothing usable is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from featherflux.errors import UserError
from featherflux.lora.train import CachedDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
ASPECT_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


@dataclass
class DataReport:
    used: list[str] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.used)} images with captions"]
        if self.missing_caption:
            parts.append(f"{len(self.missing_caption)} skipped without a .txt caption (e.g. {self.missing_caption[0]})")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} skipped as unreadable (e.g. {self.unreadable[0]})")
        return "; ".join(parts)


def scan_folder(folder: str | Path) -> tuple[list[tuple[Path, str]], DataReport]:
    """(image path, caption) pairs of every readable, captioned image in `folder`, and what was skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"training data folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) with .txt captions")
    report, pairs = DataReport(), []
    for path in images:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            report.missing_caption.append(path.name)
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception:  # noqa: BLE001  (PIL raises many types for broken files)
            report.unreadable.append(path.name)
            continue
        pairs.append((path, caption.read_text(encoding="utf-8").strip()))
        report.used.append(path.name)
    if not pairs:
        raise UserError(
            f"{folder}: no usable training images ({report.summary()}); add a same-name .txt caption next to each image"
        )
    return pairs, report


def bucket_size(width: int, height: int, resolution: int, multiple: int, buckets: bool) -> tuple[int, int]:
    """(W, H) of the bucket with about resolution^2 pixels whose aspect ratio is closest to the image's."""
    ratio = width / height
    best = min(ASPECT_RATIOS, key=lambda r: abs(math.log(r / ratio))) if buckets else 1.0

    def snap(v: float) -> int:
        return max(multiple, round(v / multiple) * multiple)

    return snap(resolution * math.sqrt(best)), snap(resolution / math.sqrt(best))


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB image scaled to cover `size` (W, H), centre-cropped, as (1, 3, H, W) in [-1, 1]."""
    w, h = size
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


@torch.no_grad()
def cache_dataset(
    pipe,
    folder: str | Path,
    *,
    resolution: int,
    buckets: bool = True,
    max_sequence_length: int = 512,
    extra_prompts: tuple[str, ...] = (),
) -> tuple[CachedDataset, dict[str, torch.Tensor], DataReport]:
    """Encode every captioned image of `folder` with the pipeline's VAE encoder and prompt encoder.

    Returns the dataset, the embeddings of `extra_prompts` (validation prompts), and the scan report."""
    pairs, report = scan_folder(folder)
    ae = pipe.autoencoder
    multiple = ae.config.downsample_factor * ae.config.patch_size
    device = next(ae.parameters()).device
    latents, embeds = [], []
    for path, caption in tqdm(pairs, desc="encoding training data", unit="img"):
        with Image.open(path) as im:
            size = bucket_size(im.width, im.height, resolution, multiple, buckets)
        z = ae.normalize(ae.encode(load_image(path, size).to(device)))
        latents.append(z[0].float().cpu())
        embeds.append(pipe.prompt_encoder.encode([caption], max_sequence_length=max_sequence_length)[0].float().cpu())
    empty = pipe.prompt_encoder.encode([""], max_sequence_length=max_sequence_length)[0].float().cpu()
    extra = {
        p: pipe.prompt_encoder.encode([p], max_sequence_length=max_sequence_length).float().cpu() for p in extra_prompts
    }
    return CachedDataset(latents, embeds, empty, report.used), extra, report


def free_encoders(pipe) -> None:
    """Drop the text encoder and the VAE encoder: after caching, training needs neither (the decoder stays for
    validation images)."""
    pipe.prompt_encoder = None
    for p in pipe.autoencoder.encoder.parameters():  # empty storage, same device and dtype: callers that read
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # them off the first parameter keep working


def cache_key(folder: str | Path, resolution: int, buckets: bool, max_sequence_length: int, model: str) -> str:
    """What a cached dataset depends on, so a changed setting re-encodes instead of silently reusing."""
    folder = Path(folder)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return json.dumps(
        {
            "files": files,
            "resolution": resolution,
            "buckets": buckets,
            "max_sequence_length": max_sequence_length,
            "model": model,
        }
    )
