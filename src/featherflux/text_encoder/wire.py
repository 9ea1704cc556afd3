"""Prompt embeddings on the wire: one safetensors body, never pickle.

The encode service answers with a safetensors file holding a single tensor, `prompt_embeds` (B, L, D), and a
string metadata header that says what it is: model id, family, max_sequence_length, dtype, prompt count and a
format version. Decoding parses that header and checks every field against the tensor and against what the
caller asked for, so a confused or hostile server can hand back wrong numbers but never run code on the client
(unlike a `torch.save` body, which unpickles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from featherflux.errors import UserError

FORMAT = "featherflux.prompt-embeds.v1"
MEDIA_TYPE = "application/octet-stream"
TENSOR_KEY = "prompt_embeds"
# Embeddings are floats; anything else in a body is a server bug or an attack, not a format to support.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WireError(UserError):
    """An embeddings body that does not parse or does not match its own header or the request."""


@dataclass(frozen=True)
class EmbeddingsHeader:
    model_id: str
    family: str
    max_sequence_length: int
    prompt_count: int
    dtype: str


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise WireError(f"embeddings of dtype {dtype} cannot be sent; use one of {', '.join(DTYPES)}")


def encode_embeddings(prompt_embeds: torch.Tensor, *, model_id: str, family: str, max_sequence_length: int) -> bytes:
    """The safetensors body for `prompt_embeds` (B, L, D) encoded at `max_sequence_length`."""
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[1] != max_sequence_length:
        raise WireError(
            f"prompt_embeds must be (prompts, {max_sequence_length}, dim), got {tuple(prompt_embeds.shape)}"
        )
    metadata = {
        "format": FORMAT,
        "model_id": model_id,
        "family": family,
        "max_sequence_length": str(max_sequence_length),
        "prompt_count": str(prompt_embeds.shape[0]),
        "dtype": dtype_name(prompt_embeds.dtype),
    }
    return save({TENSOR_KEY: prompt_embeds.detach().cpu().contiguous()}, metadata=metadata)


def _read_header(body: bytes) -> dict[str, str]:
    # safetensors.torch.load drops the metadata, so read it from the header: 8-byte little-endian length + JSON.
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + size])
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise WireError("embeddings body has no metadata header; is the server a featherflux encode-server?")
    return metadata


def _int_field(metadata: dict[str, str], name: str) -> int:
    value = metadata.get(name, "")
    if not value.isdigit():
        raise WireError(f"embeddings metadata field {name!r} must be a non-negative integer, got {value!r}")
    return int(value)


def decode_embeddings(
    body: bytes, *, prompt_count: int | None = None, max_sequence_length: int | None = None
) -> tuple[torch.Tensor, EmbeddingsHeader]:
    """Parse and check an embeddings body; `prompt_count` / `max_sequence_length` are what the request asked for."""
    try:
        tensors = load(body)
        metadata = _read_header(body)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise WireError(f"embeddings body is not a valid safetensors file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise WireError(f"embeddings body has format {metadata.get('format')!r}, expected {FORMAT!r}")
    for name in ("model_id", "family", "dtype"):
        if not isinstance(metadata.get(name), str) or not metadata[name]:
            raise WireError(f"embeddings metadata lacks {name!r}")
    header = EmbeddingsHeader(
        model_id=metadata["model_id"],
        family=metadata["family"],
        max_sequence_length=_int_field(metadata, "max_sequence_length"),
        prompt_count=_int_field(metadata, "prompt_count"),
        dtype=metadata["dtype"],
    )
    if set(tensors) != {TENSOR_KEY}:
        raise WireError(f"embeddings body must hold exactly {TENSOR_KEY!r}, got {sorted(tensors)}")
    embeds = tensors[TENSOR_KEY]
    if header.dtype not in DTYPES or embeds.dtype != DTYPES[header.dtype]:
        raise WireError(f"embeddings dtype {embeds.dtype} does not match the header's {header.dtype!r}")
    expected = (header.prompt_count, header.max_sequence_length)
    if embeds.ndim != 3 or tuple(embeds.shape[:2]) != expected:
        raise WireError(f"embeddings shape {tuple(embeds.shape)} does not match the header's {expected} x dim")
    if prompt_count is not None and header.prompt_count != prompt_count:
        raise WireError(f"asked for {prompt_count} prompts' embeddings, got {header.prompt_count}")
    if max_sequence_length is not None and header.max_sequence_length != max_sequence_length:
        raise WireError(f"asked for max_sequence_length={max_sequence_length}, got {header.max_sequence_length}")
    return embeds, header
