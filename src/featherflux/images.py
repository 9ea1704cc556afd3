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
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from featherflux.atomic import atomic_write
from featherflux.errors import MissingFileError, UserError

REFERENCE_MAX_AREA = 1024 * 1024  # diffusers' cap on reference pixels before encoding
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8


def open_reference_image(path: str | os.PathLike, what: str = "reference image") -> Image.Image:
    """Open and fully decode an image file; unreadable or corrupt files raise a UserError naming the file (as
    `what`, e.g. "mask_image")."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what} {path} cannot be read as an image ({e}); use a PNG, JPEG or WebP file") from None


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
    return 2.0 * _to_tensor(image) - 1.0


def _to_tensor(image: Image.Image) -> Tensor:
    """(1, C, H, W) float32 in [0, 1]."""
    pixels = np.array(image).astype(np.float32) / 255.0
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def inpaint_size(image: Image.Image, multiple: int = 16) -> tuple[int, int]:
    """(width, height) of an inpainting made from `image` when no size is asked: its own, shrunk to 1 megapixel and
    floored to `multiple`, as diffusers' inpainting pipeline takes it."""
    return reference_size(*image.size, multiple)


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) around every non-black pixel of `mask`, `pad` pixels wider, then grown to
    the aspect ratio of width x height within the picture (diffusers' `padding_mask_crop` region)."""
    marked = np.array(mask.convert("L")) != 0
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    if not len(rows):
        raise UserError("mask_image marks nothing to repaint (it is all black); white pixels mark what to repaint")
    h, w = marked.shape
    left, top = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    right, bottom = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (right - left) / (bottom - top) > width / height:  # too wide: grow the height
        grow = int((right - left) / (width / height) - (bottom - top))
        top, bottom = _grow(top - grow // 2, bottom + grow - grow // 2, h)
    else:
        grow = int((bottom - top) * (width / height) - (right - left))
        left, right = _grow(left - grow // 2, right + grow - grow // 2, w)
    return left, top, right, bottom


def _grow(start: int, end: int, limit: int) -> tuple[int, int]:
    """Shift [start, end) back inside [0, limit) where it spills over, then clip it."""
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def _fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to fit inside width x height keeping the aspect ratio, centred, the margins filled by stretching the
    picture's edge rows or columns (diffusers' "fill" resize mode)."""
    wide = width / height < image.width / image.height
    fit_w = width if wide else image.width * height // image.height
    fit_h = image.height * width // image.width if wide else height
    fitted = image.resize((fit_w, fit_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(fitted, box=(width // 2 - fit_w // 2, height // 2 - fit_h // 2))
    if wide and (margin := height // 2 - fit_h // 2) > 0:
        out.paste(fitted.resize((width, margin), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(fitted.resize((width, margin), box=(0, fit_h, width, fit_h)), box=(0, margin + fit_h))
    elif not wide and width / height != image.width / image.height and (margin := width // 2 - fit_w // 2) > 0:
        out.paste(fitted.resize((margin, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(fitted.resize((margin, height), box=(fit_w, 0, fit_w, height)), box=(margin + fit_w, 0))
    return out


def _resized(image: Image.Image, width: int, height: int, box: tuple[int, int, int, int] | None) -> Image.Image:
    if box is not None:
        return _fill(image.crop(box), width, height)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def inpaint_image_tensor(
    image: Image.Image, width: int, height: int, box: tuple[int, int, int, int] | None = None
) -> Tensor:
    """The picture to repaint -> (1, 3, height, width) in [-1, 1]: shrunk to 1 megapixel if larger, then resized
    (or, with a crop `box`, cropped and fitted) to the output size, as diffusers' inpainting pipeline does."""
    shrunk = _shrunk(image.width, image.height)
    if shrunk != image.size:
        image = image.resize(shrunk, Image.Resampling.LANCZOS)
    return 2.0 * _to_tensor(_resized(image, width, height, box).convert("RGB")) - 1.0


def mask_tensor(mask: Image.Image, width: int, height: int, box: tuple[int, int, int, int] | None = None) -> Tensor:
    """A mask picture -> (1, 1, height, width) of 0 (keep) and 1 (repaint): resized to the output size, made grey,
    and split at half brightness, as diffusers does."""
    grey = _to_tensor(_resized(mask, width, height, box).convert("L"))
    return (grey >= 0.5).float()


def overlay(original: Image.Image, mask: Image.Image, made: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Put a repainted crop back into the original picture: `made` (the crop, at the output size) is resized into
    `box`, and only where `mask` is white does it replace the original's pixels."""
    x, y, right, bottom = box
    base = Image.new("RGBA", original.size)
    base.paste(made.resize((right - x, bottom - y), Image.Resampling.LANCZOS), (x, y))
    result = base.convert("RGB").convert("RGBA")
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")


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
