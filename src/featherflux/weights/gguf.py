"""GGUF checkpoints, as ComfyUI-GGUF users have them: tensor names, shapes, formats and raw block bytes.

Notable features:
- city96's FLUX GGUF files store the DiT under BFL's names (`double_blocks.0.img_attn.qkv.weight`, ...), which
  are our native names; a `model.diffusion_model.` / `diffusion_model.` prefix is stripped if present. GGUF lists
  dimensions innermost first, so shapes are reversed; ComfyUI's `comfy.gguf.orig_shape.<name>` metadata wins.
- Nothing is dequantised here: a quantized tensor comes back as its raw blocks (uint8 rows) with its format id,
  for `featherflux.memory.gguf.GGUFLinear` to keep and dequantise per call.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featherflux.errors import MissingExtraError, WeightsError
from featherflux.weights.transformer import strip_bfl_prefix

FLOAT_FORMATS = ("F32", "F16", "BF16")


def gguf_package():
    """The optional `gguf` package, or a WeightsError that says how to install it."""
    try:
        import gguf  # an optional extra (featherflux[quant]), imported only to read a .gguf file
    except ImportError:
        raise MissingExtraError("reading a .gguf file", "quant") from None
    return gguf


def format_name(qtype: int) -> str:
    """The lower-case ggml name of a format id, e.g. "q4_k"."""
    return gguf_package().GGMLQuantizationType(qtype).name.lower()


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: `data` is float values for F32/F16/BF16, else raw block rows (uint8)."""

    data: torch.Tensor
    qtype: int  # ggml format id
    shape: tuple[int, ...]  # torch order

    @property
    def quantized(self) -> bool:
        return format_name(self.qtype).upper() not in FLOAT_FORMATS


def _orig_shapes(reader) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("comfy.gguf.orig_shape."):
            out[key.removeprefix("comfy.gguf.orig_shape.")] = tuple(int(field.parts[i][0]) for i in field.data)
    return out


def _reader(path: Path, mode: str = "r"):
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(str(path), mode)
    except Exception as e:  # noqa: BLE001 -- the reader raises ValueError, struct.error, IndexError... on damaged files
        raise WeightsError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _shapes(reader) -> dict[str, tuple[int, ...]]:
    orig = _orig_shapes(reader)
    return {t.name: orig.get(t.name, tuple(int(n) for n in reversed(t.shape.tolist()))) for t in reader.tensors}


def gguf_summary(path: str | Path) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Tensor shapes (torch order, native names) and the most common quantized format, e.g. "q4_k"."""
    reader = _reader(Path(path))
    formats = Counter()
    for t in reader.tensors:
        name = format_name(t.tensor_type)
        if name.upper() not in FLOAT_FORMATS:
            formats[name] += int(t.n_bytes)
    return strip_bfl_prefix(_shapes(reader)), (formats.most_common(1)[0][0] if formats else None)


def gguf_formats(path: str | Path) -> dict[str, str]:
    """The ggml format of every tensor (native names -> upper-case names, e.g. "Q4_K"), without reading data."""
    return strip_bfl_prefix({t.name: format_name(t.tensor_type).upper() for t in _reader(Path(path)).tensors})


def read_gguf(path: str | Path, *, mmap: bool = False) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file under its native name. `mmap=True`: the data are views of a private
    (copy-on-write) map of the file; otherwise they are copied out of it."""
    reader = _reader(Path(path), "c" if mmap else "r")
    shapes = _shapes(reader)
    tensors = {}
    for t in reader.tensors:
        data = torch.from_numpy(t.data if mmap else np.array(t.data))
        if format_name(t.tensor_type) == "bf16":  # numpy has no bfloat16: the reader hands out its raw 16-bit words
            data = data.view(torch.bfloat16)
        tensors[t.name] = GGUFTensor(data, int(t.tensor_type), shapes[t.name])
    return strip_bfl_prefix(tensors)
