"""Pictures in and out: reading reference images, preprocessing them like diffusers, tensors to images, PNG files.

Design choices:
- Reference preprocessing reproduces diffusers' FLUX.2 image processor: images over the area cap are resized
  (LANCZOS) to it, sides are floored to a multiple of 16, then centre-cropped (never resized again), converted to
  RGB and scaled to [-1, 1]. References are encoded one at a time at their own size.
- PNGs carry their generation parameters as tEXt chunks (one per parameter, plus all of them as JSON under
  `parameters`), and are written atomically: a temporary file in the target folder, then `os.replace`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from featherflux.atomic import atomic_write
from featherflux.errors import UserError

REFERENCE_MAX_AREA = 1024 * 1024  # diffusers' cap on reference pixels before encoding
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8


def open_reference_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; unreadable or corrupt files raise a UserError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise UserError(f"reference image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(
            f"reference image {path} cannot be read as an image ({e}); use a PNG, JPEG or WebP file"
        ) from None


def _shrunk(width: int, height: int) -> tuple[int, int]:
    if width * height <= REFERENCE_MAX_AREA:
        return width, height
    scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
    return int(width * scale), int(height * scale)


def reference_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) of a reference of this size once preprocessed (`reference_tensor`): the output size of an
    edit that gives no size."""
    width, height = _shrunk(width, height)
    return width // multiple * multiple, height // multiple * multiple


def reference_tensor(image: Image.Image, name: str, multiple: int = 16) -> Tensor:
    """A reference picture -> (1, 3, H, W) in [-1, 1], preprocessed exactly like diffusers' FLUX.2 pipelines."""
    width, height = image.size
    if min(width, height) < REFERENCE_MIN_SIDE:
        raise UserError(f"reference image {name} is {width}x{height}; both sides must be >= {REFERENCE_MIN_SIDE} px")
    if max(width, height) > REFERENCE_MAX_ASPECT * min(width, height):
        raise UserError(f"reference image {name} is {width}x{height}; the aspect ratio must be at most 8:1")
    if _shrunk(width, height) != (width, height):
        image = image.resize(_shrunk(width, height), Image.Resampling.LANCZOS)
    width, height = reference_size(width, height, multiple)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.convert("RGB").crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.array(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * pixels - 1.0


def postprocess(images: Tensor, output_type: str):
    """(B, 3, H, W) decoder output in [-1, 1] -> "pt" tensor in [0, 1], "np" (B, H, W, 3) float32 or PIL images."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


def png_text(parameters: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in parameters.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("parameters", json.dumps(parameters))
    return info


def read_png_parameters(path: str | os.PathLike) -> dict:
    """The generation parameters stored by `save_png` (the JSON `parameters` chunk)."""
    with Image.open(path) as img:
        return json.loads(img.text["parameters"])


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict) -> Path:
    """Write `image` to `path` as PNG with `parameters` in text chunks, atomically (no half-written file ever)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_text(parameters)))
