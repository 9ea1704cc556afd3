"""The pipeline's DiT from a file of any supported kind, optionally left memory-mapped.

Notable features:
- `load_pipeline(folder, transformer=FILE)` takes the folder's text encoder and autoencoder and the DiT from FILE,
  like diffusers' `transformer=` component override: a ComfyUI-GGUF `.gguf` (kept quantized as `GGUFLinear`s), a
  BFL fp8 `.safetensors` (`Float8Linear`s) or a plain BFL / diffusers checkpoint (`weights.load_transformer`).
  The kind is read from the file's header, and its architecture must be the folder's (checked before any data
  is read). A folder without `transformer/` takes the architecture from the file.
- Quantized files are read by `weights.gguf` / `weights.fp8`; here the DiT is built on the meta device, every key
  and shape is checked at once, and each quantized Linear is swapped for its `memory` layer holding the file's data.
- `mmap=True`: DiT weights stay views of a private memory map of the checkpoint (`weights.io.mmap_safetensors`; no
  copy when the dtype is unchanged), so a host with little RAM holds only the pages in use and the kernel can drop
  them again; streaming copies each block to the device when it runs. Tensors that must be transformed (diffusers'
  separate q/k/v fused into `qkv`, the final modulation's swapped halves, dtype casts) are the only copies.
  (safetensors' own reader also returns page-cache views for unchanged dtypes; mapping the file here makes that a
  guarantee, and GGUF / fp8 files would otherwise be copied into RAM.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from featherflux.errors import MissingWeightsError, WeightsError
from featherflux.memory.gguf import GGUFLinear, dequantize, supports, unsupported_format_error
from featherflux.memory.quant import Float8Linear
from featherflux.model.config import DiTConfig, FamilyConfig
from featherflux.model.dit import Flux2
from featherflux.model.swap import assign_tensor, replace_module
from featherflux.weights.fp8 import is_bfl_fp8, read_bfl_fp8
from featherflux.weights.gguf import FLOAT_FORMATS, gguf_formats, gguf_summary, read_gguf
from featherflux.weights.io import check_keys, materialize, mmap_safetensors, open_checkpoint, read_tensor
from featherflux.weights.io import safetensors_header as read_header
from featherflux.weights.transformer import (
    config_from_shapes,
    describe,
    diffusers_to_native,
    known_config,
    load_transformer,
    strip_bfl_prefix,
)


def dit_file_kind(path: str | Path) -> str:
    """ "gguf", "fp8" (BFL's float8 weights with per-row `weight_scale`) or "plain" (any other checkpoint/folder)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return "gguf"
    if path.is_file() and path.suffix == ".safetensors" and is_bfl_fp8(read_header(path)):
        return "fp8"
    return "plain"


def dit_config_from_file(path: str | Path) -> DiTConfig:
    """The architecture of a single DiT file, from its tensor shapes (no data read)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"transformer file {path} does not exist; pass a .gguf or .safetensors DiT checkpoint")
    if path.suffix == ".gguf":
        shapes, _ = gguf_summary(path)
    elif path.suffix == ".safetensors":
        shapes = strip_bfl_prefix({k: tuple(v["shape"]) for k, v in read_header(path).items()})
    else:
        raise WeightsError(f"{path}: a transformer file must be a .gguf or .safetensors checkpoint")
    return config_from_shapes(shapes, path)


def check_dit_file(path: str | Path, family: FamilyConfig, folder: str | Path = "the pipeline folder") -> None:
    """A clear error when the DiT in `path` is not the architecture of the pipeline it is loaded into."""
    found, wanted = dit_config_from_file(path), family.dit
    if dataclasses.replace(found, axes_dim=wanted.axes_dim, theta=wanted.theta) != wanted:  # RoPE is not in weights
        raise WeightsError(
            f"transformer file {path} holds {describe(found)}, but {folder} is a {family.name} pipeline "
            f"({describe(wanted)}); pass the {family.name} transformer file, or the pipeline folder of the file's "
            "family"
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
        raise MissingWeightsError(f"transformer file {path} does not exist; pass a .gguf or .safetensors DiT checkpoint")
    if override and Path(path).is_file():  # a diffusers transformer folder is checked by load_transformer
        check_dit_file(path, family)
    kind = dit_file_kind(path)
    if kind == "gguf":
        return load_gguf_transformer(path, device=device, dtype=dtype or torch.bfloat16, config=family.dit, mmap=mmap)
    if kind == "fp8":
        return load_bfl_fp8_transformer(
            path, device=device, dtype=dtype or torch.bfloat16, config=family.dit, mmap=mmap
        )
    if mmap:
        if torch.device(device).type != "cpu":
            raise WeightsError("memory-mapped weights live on the host: load with device='cpu' and place them after")
        return load_mapped_transformer(path, family.dit, dtype=dtype)
    return load_transformer(path, device=device, dtype=dtype, config=family.dit)


def load_mapped_transformer(path: str | Path, config: DiTConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A `Flux2` whose weights are views of the memory-mapped checkpoint (BFL file, diffusers folder or shards)."""
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


def _meta_dit(config: DiTConfig, shapes: dict[str, tuple[int, ...]], source) -> Flux2:
    """A `Flux2` of `config` on the meta device, after checking that `shapes` are exactly its state."""
    with torch.device("meta"):
        model = Flux2(config)
    check_keys(model, shapes, source)
    return model


def check_gguf_formats(path: str | Path) -> None:
    """A `WeightsError` naming the first tensor of a GGUF file whose quantized format has no torch dequantiser
    (`memory.gguf.SUPPORTED_FORMATS`), read from the header alone."""
    for name, fmt in gguf_formats(path).items():
        if fmt not in FLOAT_FORMATS and not supports(fmt):
            raise unsupported_format_error(fmt, name, path)


def load_gguf_transformer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: DiTConfig | None = None,
    mmap: bool = False,
) -> Flux2:
    """A `Flux2` DiT from a GGUF file: quantized Linear weights stay quantized (`GGUFLinear`), the rest in `dtype`.

    `config`: the architecture expected (e.g. the pipeline folder's); None = the file's (a named family's when the
    shapes are one). `mmap=True` (host only): quantized blocks stay views of a private map of the file. A file with
    a quantized format that has no torch kernel is refused before any data are read."""
    check_gguf_formats(path)
    tensors = read_gguf(path, mmap=mmap)
    shapes = {k: t.shape for k, t in tensors.items()}
    model = _meta_dit(config or known_config(config_from_shapes(shapes, path)), shapes, path)
    for name, t in tensors.items():
        module_name = name.removesuffix(".weight")
        if not t.quantized:
            assign_tensor(model, name, t.data.reshape(t.shape).to(device, dtype))
        elif name.endswith(".weight") and isinstance(linear := model.get_submodule(module_name), nn.Linear):
            row_bytes = t.data.numel() // linear.out_features
            layer = GGUFLinear(linear.in_features, linear.out_features, t.qtype, row_bytes, device="meta")
            layer.weight = t.data.reshape(linear.out_features, -1).to(device)
            replace_module(model, module_name, layer)
        else:  # a quantized tensor that is not a Linear weight: dequantised once, here
            assign_tensor(model, name, dequantize(t.data, t.qtype, t.shape, dtype).to(device))
    return model


def load_bfl_fp8_transformer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: DiTConfig | None = None,
    mmap: bool = False,
) -> Flux2:
    """A `Flux2` DiT from one of BFL's fp8 checkpoints (`weights.fp8`): fp8 Linears become `Float8Linear`s,
    everything else is cast to `dtype`.

    `config`: the architecture expected; None = the file's (a named family's when the shapes are one).
    `mmap=True` (host only): fp8 weights, and tensors already in `dtype`, stay views of a private map of the file.
    """
    checkpoint = read_bfl_fp8(path, mmap=mmap)
    shapes = {k: tuple(t.shape) for k, t in checkpoint.tensors.items()}
    model = _meta_dit(config or known_config(config_from_shapes(shapes, path)), shapes, path)
    for name in sorted(checkpoint.tensors):
        module_name, _, attr = name.rpartition(".")
        value = read_tensor(checkpoint.tensors[name])
        if module_name in checkpoint.scales and attr == "weight":
            linear = model.get_submodule(module_name)
            layer = Float8Linear(linear.in_features, linear.out_features, False, dtype, "meta")
            layer.weight = value.to(device, torch.float8_e4m3fn)  # a view of the file map when mmap'd
            scale = read_tensor(checkpoint.scales[module_name]).to(device, torch.float32).reshape(-1)
            layer.weight_scale = scale.expand(linear.out_features).contiguous() if scale.numel() == 1 else scale
            replace_module(model, module_name, layer)
        else:
            assign_tensor(model, name, value.to(device, dtype))
    return model
