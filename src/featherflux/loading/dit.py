"""The pipeline's DiT from a file of any supported kind, optionally left memory-mapped.

Notable features:
- `load_pipeline(folder, transformer=FILE)` takes the folder's text encoder and autoencoder and the DiT from FILE,
  like diffusers' `transformer=` component override: a ComfyUI-GGUF `.gguf` (kept quantized as `GGUFLinear`s), a
  BFL fp8 `.safetensors` (`Float8Linear`s) or a plain BFL / diffusers checkpoint (`weights.load_transformer`).
  The kind is read from the file's header, and its architecture must be the folder's (checked before any data
  is read). A folder without `transformer/` takes the architecture from the file.
- `mmap=True`: DiT weights stay views of a private memory map of the checkpoint (`offload.mmap_safetensors`; no
  copy when the dtype is unchanged), so a host with little RAM holds only the pages in use and the kernel can drop
  them again; streaming copies each block to the device when it runs. Tensors that must be transformed (diffusers'
  separate q/k/v fused into `qkv`, the final modulation's swapped halves, dtype casts) are the only copies.
  (safetensors' own reader also returns page-cache views for unchanged dtypes; mapping the file here makes that a
  guarantee, and GGUF / fp8 files would otherwise be copied into RAM.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from featherflux.errors import WeightsError
from featherflux.model.config import DiTConfig, FamilyConfig


def _safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def dit_file_kind(path: str | Path) -> str:
    """ "gguf", "fp8" (BFL's float8 weights with per-row `weight_scale`) or "plain" (any other checkpoint/folder)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return "gguf"
    if path.is_file() and path.suffix == ".safetensors":
        header = _safetensors_header(path)
        if any(k.endswith(".weight_scale") for k in header) or any(v["dtype"] == "F8_E4M3" for v in header.values()):
            return "fp8"
    return "plain"


def dit_config_from_file(path: str | Path) -> DiTConfig:
    """The architecture of a single DiT file, from its tensor shapes (no data read)."""
    from featherflux.weights.transformer import config_from_shapes, strip_bfl_prefix

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"transformer file {path} does not exist; pass a .gguf or .safetensors DiT checkpoint")
    if path.suffix == ".gguf":
        from featherflux.memory.gguf import gguf_summary

        shapes, _ = gguf_summary(path)
    elif path.suffix == ".safetensors":
        shapes = {k: tuple(v["shape"]) for k, v in _safetensors_header(path).items()}
    else:
        raise WeightsError(f"{path}: a transformer file must be a .gguf or .safetensors checkpoint")
    return config_from_shapes(strip_bfl_prefix({k: SimpleNamespace(shape=s) for k, s in shapes.items()}), path)


def check_dit_file(path: str | Path, family: FamilyConfig, folder: str | Path = "the pipeline folder") -> None:
    """A clear error when the DiT in `path` is not the architecture of the pipeline it is loaded into."""
    from featherflux.weights.transformer import describe

    found, wanted = dit_config_from_file(path), family.dit
    if dataclasses.replace(found, axes_dim=wanted.axes_dim, theta=wanted.theta) != wanted:  # RoPE is not in weights
        raise WeightsError(
            f"transformer file {path} holds {describe(found)}, but {folder} is a {family.name} pipeline "
            f"({describe(wanted)}); pass the {family.name} transformer file, or the pipeline folder of the file's family"
        )


def load_dit(
    path: str | Path,
    family: FamilyConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mmap: bool = False,
    override: bool = False,
) -> nn.Module:
    """The `Flux2` DiT of `family` from `path`: a pipeline's `transformer/` folder or, with `override=True`, a single
    file replacing it (checked against `family` first). GGUF and fp8 files keep their quantized weights; their
    unquantized tensors load in `dtype` (None: bf16). `mmap=True` leaves weights file-backed (see module doc)."""
    if override and not Path(path).exists():
        raise WeightsError(f"transformer file {path} does not exist; pass a .gguf or .safetensors DiT checkpoint")
    if override and Path(path).is_file():  # a diffusers transformer folder is checked by load_transformer
        check_dit_file(path, family)
    kind = dit_file_kind(path)
    if kind == "gguf":
        from featherflux.memory.gguf import load_gguf_transformer

        return load_gguf_transformer(path, device=device, dtype=dtype or torch.bfloat16, config=family.dit, mmap=mmap)
    if kind == "fp8":
        from featherflux.memory.quant import load_bfl_fp8_transformer

        return load_bfl_fp8_transformer(
            path, device=device, dtype=dtype or torch.bfloat16, config=family.dit, mmap=mmap
        )
    if mmap:
        if torch.device(device).type != "cpu":
            raise WeightsError("memory-mapped weights live on the host: load with device='cpu' and place them after")
        return load_mapped_transformer(path, family.dit, dtype=dtype)
    from featherflux.weights import load_transformer

    return load_transformer(path, device=device, dtype=dtype, config=family.dit)


def load_mapped_transformer(path: str | Path, config: DiTConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A `Flux2` whose weights are views of the memory-mapped checkpoint (BFL file, diffusers folder or shards)."""
    from featherflux.memory.offload import mmap_safetensors
    from featherflux.model.dit import Flux2
    from featherflux.weights.io import materialize, open_checkpoint
    from featherflux.weights.transformer import diffusers_to_native, strip_bfl_prefix

    checkpoint = open_checkpoint(path)  # validates the file set (shards, index) and names a damaged file
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint.files:
        tensors.update(mmap_safetensors(file))
    tensors = strip_bfl_prefix(tensors)
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in tensors):
        tensors = diffusers_to_native(tensors)
    with torch.device("meta"):
        model = Flux2(config)
    # materialize assigns each tensor as it is when device and dtype already match: the mapped view itself
    materialize(model, tensors, device="cpu", dtype=dtype, source=checkpoint.files[0])
    return model.requires_grad_(False)
