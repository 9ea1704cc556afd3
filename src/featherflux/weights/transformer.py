"""Loading and saving the FLUX.2 transformer: BFL single files (native names) and diffusers folders.

The key maps below are data: renames per global key, per double block and per single block, the fused
projections (diffusers keeps q, k, v apart; we keep BFL's fused `qkv`), and the final modulation whose halves
are stored in the opposite order ((shift, scale) in BFL, (scale, shift) in diffusers). They are applied lazily
to `LazyTensor`s, so shapes are checked before any data is read. Saving applies the same tables backwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch

from featherflux.errors import WeightsError
from featherflux.model.config import FAMILIES, DiTConfig, FamilyConfig
from featherflux.model.dit import Flux2
from featherflux.weights.io import (
    DEFAULT_MAX_SHARD_BYTES,
    LazyTensor,
    materialize,
    open_checkpoint,
    read_tensor,
    save_safetensors,
)

# native name -> diffusers name
GLOBAL_RENAMES = {
    "img_in.weight": "x_embedder.weight",
    "txt_in.weight": "context_embedder.weight",
    "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
    "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
    "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
    "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
    "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
    "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight",
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1.weight"}  # (shift, scale) <-> (scale, shift) along dim 0

DOUBLE_RENAMES = {  # under double_blocks.{i}. <-> transformer_blocks.{i}.
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight",
    "txt_attn.proj.weight": "attn.to_add_out.weight",
    "img_mlp.0.weight": "ff.linear_in.weight",
    "img_mlp.2.weight": "ff.linear_out.weight",
    "txt_mlp.0.weight": "ff_context.linear_in.weight",
    "txt_mlp.2.weight": "ff_context.linear_out.weight",
}
DOUBLE_FUSED = {  # native fused weight -> diffusers parts, concatenated along dim 0
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
}
SINGLE_RENAMES = {  # under single_blocks.{i}. <-> single_transformer_blocks.{i}.
    "linear1.weight": "attn.to_qkv_mlp_proj.weight",
    "linear2.weight": "attn.to_out.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

DIFFUSERS_CLASS = "Flux2Transformer2DModel"
T = TypeVar("T")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _block_indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _concat(parts: list[torch.Tensor | LazyTensor]) -> LazyTensor:
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return LazyTensor(shape, parts[0].dtype, lambda: torch.cat([read_tensor(p) for p in parts]))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


def _swapped(t: torch.Tensor | LazyTensor) -> LazyTensor:
    return LazyTensor(tuple(t.shape), t.dtype, lambda: _swap_halves(read_tensor(t)))


def _name_table(double: list[int], single: list[int]) -> dict[str, str | tuple[str, ...]]:
    """Native name -> diffusers name (or the diffusers names of its parts, for fused weights)."""
    table: dict[str, str | tuple[str, ...]] = dict(GLOBAL_RENAMES)
    for i in double:
        for native, diffusers in DOUBLE_RENAMES.items():
            table[f"double_blocks.{i}.{native}"] = f"transformer_blocks.{i}.{diffusers}"
        for native, parts in DOUBLE_FUSED.items():
            table[f"double_blocks.{i}.{native}"] = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
    for i in single:
        for native, diffusers in SINGLE_RENAMES.items():
            table[f"single_blocks.{i}.{native}"] = f"single_transformer_blocks.{i}.{diffusers}"
    return table


def diffusers_to_native(tensors: dict[str, torch.Tensor | LazyTensor]) -> dict[str, torch.Tensor | LazyTensor]:
    """Translate diffusers names to native ones; fused and swapped weights become `LazyTensor`s (read on load).
    Keys that fit no rule keep their names, so `materialize` reports them."""
    table = _name_table(
        _block_indices(tensors, "transformer_blocks."), _block_indices(tensors, "single_transformer_blocks.")
    )
    out: dict[str, torch.Tensor | LazyTensor] = {}
    used: set[str] = set()
    for native, source in table.items():
        names = (source,) if isinstance(source, str) else source
        if not all(n in tensors for n in names):
            continue
        used.update(names)
        lazy = tensors[names[0]] if isinstance(source, str) else _concat([tensors[n] for n in names])
        out[native] = _swapped(lazy) if native in SWAPPED_HALVES else lazy
    out.update({k: v for k, v in tensors.items() if k not in used})
    return out


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a native state dict to diffusers names (fused weights split into views)."""
    table = _name_table(_block_indices(state, "double_blocks."), _block_indices(state, "single_blocks."))
    out: dict[str, torch.Tensor] = {}
    for native, t in state.items():
        target = table.get(native)
        if target is None:
            raise WeightsError(
                f"cannot save {native!r}: not a plain FLUX.2 parameter; fuse LoRA adapters and save an unquantized, "
                "unwrapped model"
            )
        if native in SWAPPED_HALVES:
            t = _swap_halves(t)
        if isinstance(target, str):
            out[target] = t
        else:
            out.update(zip(target, t.chunk(len(target))))
    return out


def strip_bfl_prefix(tensors: dict[str, T]) -> dict[str, T]:
    """Names without the `model.diffusion_model.` / `diffusion_model.` prefix of BFL, ComfyUI and GGUF files."""
    for prefix in BFL_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


# --- configs --------------------------------------------------------------------------------------------------


def config_from_diffusers(cfg: dict, source: str | os.PathLike) -> DiTConfig:
    """A diffusers `Flux2Transformer2DModel` config.json -> DiTConfig."""
    # transformers configs name their class in "architectures"; a bare dict (no name at all) is taken as FLUX.2
    found = cfg.get("_class_name") or ", ".join(cfg.get("architectures", [])) or DIFFUSERS_CLASS
    if found != DIFFUSERS_CLASS:
        raise WeightsError(f"{source} describes a {found}, not a FLUX.2 transformer ({DIFFUSERS_CLASS})")
    unsupported = {
        "patch_size": (cfg.get("patch_size", 1), 1),
        "out_channels": (cfg.get("out_channels"), None),
        "eps": (cfg.get("eps", 1e-6), 1e-6),
    }
    for name, (value, supported) in unsupported.items():
        if value != supported and not (name == "out_channels" and value == cfg.get("in_channels", 128)):
            raise WeightsError(f"{source}: {name}={value} is not supported (FLUX.2 uses {supported})")
    defaults = DiTConfig()
    heads = cfg.get("num_attention_heads", defaults.num_heads)
    try:
        return DiTConfig(
            in_channels=cfg.get("in_channels", defaults.in_channels),
            context_in_dim=cfg.get("joint_attention_dim", defaults.context_in_dim),
            hidden_size=heads * cfg.get("attention_head_dim", defaults.head_dim),
            num_heads=heads,
            depth=cfg.get("num_layers", defaults.depth),
            depth_single_blocks=cfg.get("num_single_layers", defaults.depth_single_blocks),
            mlp_ratio=float(cfg.get("mlp_ratio", defaults.mlp_ratio)),
            axes_dim=tuple(cfg.get("axes_dims_rope", defaults.axes_dim)),
            theta=cfg.get("rope_theta", defaults.theta),
            guidance_embed=cfg.get("guidance_embeds", defaults.guidance_embed),
            timestep_dim=cfg.get("timestep_guidance_channels", defaults.timestep_dim),
        )
    except ValueError as e:
        raise WeightsError(f"{source}: inconsistent transformer config: {e}") from e


def config_to_diffusers(config: DiTConfig) -> dict:
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.42.1",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "out_channels": None,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "timestep_guidance_channels": config.timestep_dim,
        "mlp_ratio": config.mlp_ratio,
        "axes_dims_rope": list(config.axes_dim),
        "rope_theta": config.theta,
        "eps": 1e-6,
        "guidance_embeds": config.guidance_embed,
    }


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)


def dit_outline(tensors: Mapping[str, object], source: str | os.PathLike) -> tuple[int, int, int]:
    """(hidden size, double blocks, single blocks) from native names and shapes (tensors, `LazyTensor`s or shape
    tuples): all it takes to tell the FLUX.2 families apart."""
    if "img_in.weight" not in tensors:
        raise WeightsError(
            f"{source} does not look like a FLUX.2 transformer (no img_in.weight); expected a BFL flux2/klein "
            ".safetensors or .gguf file or a diffusers transformer folder"
        )
    hidden = _shape(tensors["img_in.weight"])[0]
    return hidden, len(_block_indices(tensors, "double_blocks.")), len(_block_indices(tensors, "single_blocks."))


def config_from_shapes(tensors: Mapping[str, object], source: str | os.PathLike) -> DiTConfig:
    """Infer a DiTConfig from native names and shapes (RoPE axes and theta are not in the weights: FLUX.2's)."""
    required = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "double_blocks.0.img_mlp.2.weight"]
    absent = [k for k in required if k not in tensors]
    if absent:
        raise WeightsError(
            f"{source} does not look like a FLUX.2 transformer (no {', '.join(absent)}); expected a BFL "
            "flux2/klein .safetensors file or a diffusers transformer folder"
        )
    hidden, depth, depth_single = dit_outline(tensors, source)
    in_channels = _shape(tensors["img_in.weight"])[1]
    head_dim = _shape(tensors["double_blocks.0.img_attn.norm.query_norm.scale"])[0]
    mlp_hidden = _shape(tensors["double_blocks.0.img_mlp.2.weight"])[1]
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:
        mlp_ratio = (mlp_hidden + 0.5) / hidden
    try:
        return DiTConfig(
            in_channels=in_channels,
            context_in_dim=_shape(tensors["txt_in.weight"])[1],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            mlp_ratio=mlp_ratio,
            axes_dim=(head_dim // 4,) * 4,
            guidance_embed="guidance_in.in_layer.weight" in tensors,
            timestep_dim=_shape(tensors["time_in.in_layer.weight"])[1],
        )
    except ValueError as e:
        raise WeightsError(f"{source}: tensor shapes give an inconsistent transformer: {e}") from e


def family_of(config: DiTConfig) -> str | None:
    """The named family with this architecture (RoPE settings are not compared: weights do not carry them)."""
    return next((name for name, family in FAMILIES.items() if _same_architecture(family.dit, config)), None)


def family_with_outline(outline: tuple[int, int, int]) -> FamilyConfig:
    """The named family whose DiT has this (hidden size, double blocks, single blocks)."""
    for family in FAMILIES.values():
        if (family.dit.hidden_size, family.dit.depth, family.dit.depth_single_blocks) == outline:
            return family
    hidden, depth, depth_single = outline
    raise WeightsError(f"no known FLUX.2 family has hidden size {hidden} and {depth}+{depth_single} blocks")


def known_config(config: DiTConfig) -> DiTConfig:
    """The named family's config when `config` is its architecture (so its RoPE settings apply), else `config`."""
    name = family_of(config)
    return FAMILIES[name].dit if name else config


def describe(config: DiTConfig) -> str:
    name = family_of(config)
    if name:
        return name
    return (
        f"a custom transformer (hidden {config.hidden_size}, {config.depth} double + {config.depth_single_blocks} "
        f"single blocks, context {config.context_in_dim}, guidance embedding {config.guidance_embed})"
    )


def _requested(config: str | DiTConfig | None) -> DiTConfig | None:
    if config is None or isinstance(config, DiTConfig):
        return config
    if config not in FAMILIES:
        raise WeightsError(f"unknown model family {config!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[config].dit


def _same_architecture(a: DiTConfig, b: DiTConfig) -> bool:
    # RoPE axes and theta cannot be read from weights: a requested config decides them
    def shape_fields(c: DiTConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("axes_dim", "theta")}

    return shape_fields(a) == shape_fields(b)


# --- load / save ----------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> tuple[dict[str, LazyTensor], DiTConfig | None, Path]:
    """-> native lazy tensors, the config stored next to them (diffusers folders) or None, the weights path."""
    if path.is_dir() and (path / "transformer" / "config.json").is_file() and not (path / "config.json").exists():
        path = path / "transformer"  # a diffusers pipeline folder
    stored = None
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                cfg = json.loads((path / "config.json").read_text())
            except ValueError as e:
                raise WeightsError(f"{path / 'config.json'} is not valid JSON: {e}") from e
            stored = config_from_diffusers(cfg, path / "config.json")
        elif not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
            raise WeightsError(
                f"{path} is neither a diffusers transformer folder (config.json + {WEIGHTS_NAME}) nor a pipeline "
                "folder with transformer/, and holds no .safetensors file; pass one of those or a BFL checkpoint file"
            )
    ckpt = open_checkpoint(path)
    tensors = strip_bfl_prefix(ckpt.lazy())
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in tensors):
        tensors = diffusers_to_native(tensors)
    return tensors, stored, path


def load_transformer(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: str | DiTConfig | None = None,
) -> Flux2:
    """Load a FLUX.2 transformer from a BFL `.safetensors` file, a diffusers `transformer/` folder (one file or
    shards), or a diffusers pipeline folder. The architecture comes from `config.json` or, for single files, from
    the tensor shapes; `config` (a family name or a DiTConfig) names what is expected, and a checkpoint of another
    architecture is an error. Loads straight onto `device` in `dtype` (None: the checkpoint's), frozen, in eval mode.
    """
    path = Path(path)
    tensors, stored, weights_path = _read_checkpoint(path)
    found = stored or config_from_shapes(tensors, weights_path)
    wanted = _requested(config)
    if wanted is not None:
        if not _same_architecture(found, wanted):
            raise WeightsError(f"{path} holds {describe(found)}, but {describe(wanted)} was asked for")
        found = wanted
    with torch.device("meta"):
        model = Flux2(found)
    materialize(model, tensors, device=device, dtype=dtype, source=weights_path)
    return model.requires_grad_(False)


def save_transformer(model: Flux2, folder: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """Save in diffusers layout (`config.json` + safetensors, sharded above `max_shard_bytes`), which diffusers'
    `Flux2Transformer2DModel.from_pretrained(folder)` and `load_transformer(folder)` both open."""
    state = native_to_diffusers(model.state_dict())
    config = config_to_diffusers(model.config)
    return save_safetensors(state, folder, weights_name=WEIGHTS_NAME, config=config, max_shard_bytes=max_shard_bytes)
