"""GGUF-quantized Linears: the blocks of a GGUF file kept as they are, dequantised per call.

Notable features:
- The file is read by `featherflux.weights.gguf`; the DiT is built from it by `featherflux.loading`.
- Each quantized Linear becomes a `GGUFLinear` holding the raw block bytes (uint8 rows) and the format id; its
  forward dequantises with torch ops on whatever device the bytes are on, then runs an ordinary matmul in the
  activation dtype. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K have torch kernels
  (`SUPPORTED_FORMATS`); nothing goes through numpy. A file with a quantized tensor in any other format is refused
  by the loader before its data are read (`supports`), and `dequantizer` raises a `WeightsError` for one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featherflux.errors import WeightsError
from featherflux.weights.gguf import gguf_package

# ------------------------------------------------------------------------------------------- torch dequantisers
# Each takes raw blocks (n_blocks, block_bytes) uint8 and returns (n_blocks, block_size) float32.


def _f16(raw: Tensor) -> Tensor:
    return raw.contiguous().view(torch.float16).float()


def _q8_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _nibbles(qs: Tensor) -> Tensor:
    """16 bytes -> 32 values: all low nibbles first, then all high nibbles (ggml's Q4/Q5 order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: Tensor) -> Tensor:
    """4 bytes (a little-endian uint32) -> 32 bits, bit j for value j."""
    bits = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh[:, :, None] >> bits) & 1).reshape(qh.shape[0], 32)


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], dim=1)
    mn = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _crumbs(qs: Tensor) -> Tensor:
    """(n, 64) bytes -> (n, 16, 16) two-bit values: each 32-byte half gives its bits 0-1, 2-3, 4-5, 6-7 in turn."""
    shifts = torch.arange(0, 8, 2, device=qs.device, dtype=torch.uint8)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts[:, None]) & 3).reshape(-1, 16, 16)


def _q2_k(b: Tensor) -> Tensor:
    sc = b[:, 0:16]  # per 16 values: scale in the low nibble, min in the high nibble
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).float())[:, :, None]
    ml = (dmin * (sc >> 4).float())[:, :, None]
    return (dl * _crumbs(b[:, 16:80]).float() - ml).reshape(-1, 256)


def _q3_k(b: Tensor) -> Tensor:
    hmask, s, d = b[:, 0:32], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low 4 bits from the nibbles of bytes 0-7, high 2 bits from the crumbs of bytes 8-11
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    high = ((s[:, None, 8:12] >> shifts[:, None]) & 3).reshape(-1, 16)
    scale = (low | (high << 4)).float() - 32
    # value = two low bits - 4 where its bit in hmask is clear (bit j of byte l: value 32j + l)
    bits = torch.arange(8, device=b.device, dtype=torch.uint8)
    clear = (((hmask[:, None, :] >> bits[:, None]) & 1) ^ 1).reshape(-1, 16, 16)
    q = _crumbs(b[:, 32:96]).float() - 4 * clear.float()
    return ((d * scale)[:, :, None] * q).reshape(-1, 256)


def _q4_k(b: Tensor) -> Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 64 values: low nibbles then high nibbles
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1, 256)


def _q5_k(b: Tensor) -> Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # bit 2j / 2j+1 of byte l: high bit of value l in sub-block 2j / 2j+1
    qs = b[:, 48:176].reshape(-1, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    bits = torch.arange(8, device=b.device, dtype=torch.uint8)
    high = ((qh[:, None, :] >> bits[None, :, None]) & 1) << 4  # (n, 8 sub-blocks, 32)
    q = (low | high).float()
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1, 256)


def _q6_k(b: Tensor) -> Tensor:
    ql = b[:, 0:128].reshape(-1, 2, 64)  # two halves of 128 values
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)
    d = _f16(b[:, 208:210])
    q = (
        torch.stack(
            [
                (ql[:, :, :32] & 0x0F) | ((qh & 3) << 4),
                (ql[:, :, 32:] & 0x0F) | (((qh >> 2) & 3) << 4),
                (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4),
                (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4),
            ],
            dim=2,
        ).float()
        - 32
    )  # (n, 2 halves, 4 quarters, 32)
    scale = sc.reshape(-1, 2, 4, 2)[..., None].expand(-1, -1, -1, -1, 16).reshape(-1, 2, 4, 32)  # 16 values per scale
    return (d[:, :, None, None] * scale * q).reshape(-1, 256)


_TORCH_DEQUANT = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


SUPPORTED_FORMATS = tuple(_TORCH_DEQUANT)  # the quantized GGUF formats a `GGUFLinear` can hold

Dequantizer = Callable[[Tensor, tuple[int, ...], torch.dtype], Tensor]


def _format(qtype: int | str) -> str:
    return qtype.upper() if isinstance(qtype, str) else gguf_package().GGMLQuantizationType(qtype).name


def supports(qtype: int | str) -> bool:
    """Whether the quantized GGUF format `qtype` (a ggml id or name) has a torch dequantiser."""
    return _format(qtype) in _TORCH_DEQUANT


def unsupported_format_error(qtype: int | str, tensor: str | None = None, source=None) -> WeightsError:
    """The error for a quantized format with no torch kernel, naming the tensor and file when given."""
    what = f"tensor {tensor} is in GGUF format {_format(qtype)}" if tensor else f"GGUF format {_format(qtype)}"
    where = f"{source}: " if source else ""
    return WeightsError(
        f"{where}{what}, which featherflux cannot dequantise; supported quantized formats: "
        f"{', '.join(SUPPORTED_FORMATS)} (F32, F16 and BF16 tensors load as they are); convert the file to one of them"
    )


def dequantizer(qtype: int) -> Dequantizer:
    """The function that turns raw GGUF bytes (rows of uint8 blocks) of format `qtype` into a tensor of a shape and
    dtype, with torch ops on the bytes' device: looked up once per layer, not per call. A `WeightsError` for a
    format with no torch kernel."""
    gguf = gguf_package()
    kind = gguf.GGMLQuantizationType(qtype)
    fn = _TORCH_DEQUANT.get(kind.name)
    if fn is None:
        raise unsupported_format_error(kind.name)
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]

    def with_torch(raw: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return fn(raw.reshape(-1, block_bytes)).to(dtype).reshape(shape)

    return with_torch


def dequantize(raw: Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Raw GGUF bytes (rows of uint8 blocks) of format `qtype` -> a tensor of `shape` in `dtype`."""
    return dequantizer(qtype)(raw, shape, dtype)


class GGUFLinear(nn.Module):
    """A Linear whose weight is kept as GGUF blocks: `weight` (out, bytes per row) uint8 and the format id."""

    def __init__(self, in_features: int, out_features: int, qtype: int, row_bytes: int, device=None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("weight", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.dequantize_blocks = dequantizer(qtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize_blocks(self.weight, (self.out_features, self.in_features), x.dtype))
