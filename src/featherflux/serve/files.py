"""Where the image service keeps pictures: generated names only, atomic writes, parameters in PNG text chunks.

A stored name is `<32 hex job id>-<index>.png`; anything else is refused before the file system is touched, so a
request cannot name a path outside the output folder. Uploaded reference images live in `uploads/` under the same
folder and are never served back.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

from PIL import Image, PngImagePlugin

from featherflux.errors import UserError

OUTPUT_NAME = re.compile(r"[0-9a-f]{32}-[0-9]{1,3}\.png")
UPLOAD_NAME = re.compile(r"[0-9a-f]{32}\.png")
MAX_REFERENCE_PIXELS = 4096 * 4096


def new_id() -> str:
    return uuid.uuid4().hex


def _write_atomic(folder: Path, name: str, image: Image.Image, pnginfo: PngImagePlugin.PngInfo | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo)
        os.replace(tmp, folder / name)
    except BaseException:
        os.unlink(tmp)
        raise
    return folder / name


def write_output(folder: Path, job_id: str, index: int, image: Image.Image, parameters: dict) -> str:
    """Write one generated image with its parameters as a JSON `parameters` text chunk; return its name."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    info.add_text("Software", "featherflux")
    name = f"{job_id}-{index}.png"
    _write_atomic(folder, name, image, info)
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
    except Exception as e:  # PIL raises many types for bad bytes; all mean the same to the client
        raise UserError(f"{what} is not a readable image (PNG, JPEG or WebP): {e}") from None
    return image.convert("RGB")


def save_upload(folder: Path, image: Image.Image) -> str:
    """Keep a reference image on disk (so a queued job survives a restart); return its name under `uploads/`."""
    name = f"{new_id()}.png"
    _write_atomic(folder / "uploads", name, image, None)
    return name


def load_upload(folder: Path, name: str) -> Image.Image:
    if not UPLOAD_NAME.fullmatch(name):
        raise UserError(f"reference {name!r} is not an upload name")
    with Image.open(folder / "uploads" / name) as image:
        return image.convert("RGB")
