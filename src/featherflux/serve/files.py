"""Where the image service keeps pictures: generated names only, atomic writes, parameters in PNG text chunks.

A stored name is `<32 hex job id>-<index>.png`; anything else is refused before the file system is touched, so a
request cannot name a path outside the output folder. Uploaded reference images live in `uploads/` under the same
folder and are never served back.
"""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from featherflux.errors import UserError
from featherflux.images import reference_tensor, save_png
from featherflux.request import ImageParameters

OUTPUT_NAME = re.compile(r"[0-9a-f]{32}-[0-9]{1,3}\.png")
UPLOAD_NAME = re.compile(r"[0-9a-f]{32}\.png")
MAX_REFERENCE_PIXELS = 4096 * 4096


def new_id() -> str:
    return uuid.uuid4().hex


def write_output(folder: Path, job_id: str, index: int, image: Image.Image, parameters: ImageParameters) -> str:
    """Write one generated image, atomically, with its parameters in PNG text chunks; return its name."""
    name = f"{job_id}-{index}.png"
    save_png(image, folder / name, parameters.as_dict())
    return name


def output_path(folder: Path, name: str) -> Path | None:
    """The file behind a name from the API, or None when the name is not one we generate or does not exist."""
    if not OUTPUT_NAME.fullmatch(name):
        return None
    path = folder / name
    return path if path.is_file() else None


def decode_upload(data: bytes, *, what: str) -> Image.Image:
    """Open uploaded bytes as an RGB picture, or raise UserError saying the upload is not a usable image."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_REFERENCE_PIXELS:
            raise UserError(f"{what} is {image.width}x{image.height}; send at most {MAX_REFERENCE_PIXELS} pixels")
        image.load()
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what} is not a readable image (PNG, JPEG or WebP): {e}") from None
    image = image.convert("RGB")
    reference_tensor(image, what)  # the pipeline's own size and aspect checks, before the job is queued
    return image


def decode_mask(data: bytes, *, what: str = "mask") -> Image.Image:
    """An uploaded mask as a grey picture, white = repaint. OpenAI's masks mark what to edit with fully transparent
    pixels, so a mask with an alpha channel is read that way; one without is taken as grey, white = repaint."""
    try:
        mask = Image.open(io.BytesIO(data))
        if mask.width * mask.height > MAX_REFERENCE_PIXELS:
            raise UserError(f"{what} is {mask.width}x{mask.height}; send at most {MAX_REFERENCE_PIXELS} pixels")
        mask.load()
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what} is not a readable image (PNG with transparency, or black and white): {e}") from None
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L")


def save_upload(folder: Path, image: Image.Image) -> str:
    """Keep a reference image on disk (so a queued job survives a restart); return its name under `uploads/`."""
    name = f"{new_id()}.png"
    save_png(image, folder / "uploads" / name, {"source": "upload"})
    return name


def delete_uploads(folder: Path, names: tuple[str, ...] | list[str]) -> None:
    """Remove reference images nobody needs any more (their job finished, or was never queued)."""
    for name in names:
        if UPLOAD_NAME.fullmatch(name):
            (folder / "uploads" / name).unlink(missing_ok=True)


def load_upload(folder: Path, name: str, mode: str = "RGB") -> Image.Image:
    if not UPLOAD_NAME.fullmatch(name):
        raise UserError(f"reference {name!r} is not an upload name")
    with Image.open(folder / "uploads" / name) as image:
        return image.convert(mode)
