"""Autoencoder checkpoints: BFL's `ae.safetensors` (our native names) and diffusers' `AutoencoderKLFlux2` folders.

Design:
- The native <-> diffusers key map is one table of name-part pairs (data) that renames keys either way, plus one
  transform: the mid-attention q/k/v/proj_out weights are 1x1 convs natively ([C, C, 1, 1]) and
  `Linear`s in diffusers ([C, C]).
- The config comes from `config.json` for diffusers folders. A single file has no config, so it is read from the
  tensor shapes; only the GroupNorm group count cannot be seen there, it is taken to be the real model's 32
  (pass `config=` for anything else).
- `bn.num_batches_tracked` is a training counter that never affects outputs; diffusers' conversion script drops it,
  so a checkpoint without it loads with a zero counter.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from featherflux.errors import MissingWeightsError, WeightsError
from featherflux.model.autoencoder import AutoEncoder
from featherflux.model.config import AutoEncoderConfig
from featherflux.weights.io import LazyTensor, materialize, open_checkpoint, save_safetensors

DIFFUSERS_CLASS = "AutoencoderKLFlux2"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
BFL_FILE = "ae.safetensors"
NUM_BATCHES_TRACKED = "bn.num_batches_tracked"

# Native (BFL) name part <-> diffusers name part. `{i}` is a level index as BFL counts it (by resolution), `{r}`
# the same level as diffusers counts decoder levels (in execution order, deepest first): r = levels - 1 - i.
# Parts starting with "." match anywhere, the others at the start of the key; every matching pair applies, in order.
KEY_PARTS: list[tuple[str, str]] = [
    ("encoder.quant_conv.", "quant_conv."),
    ("decoder.post_quant_conv.", "post_quant_conv."),
    ("encoder.down.{i}.block.", "encoder.down_blocks.{i}.resnets."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.", "decoder.up_blocks.{r}.resnets."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{r}.upsamplers.0."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
]
# Native 1x1-conv weights that diffusers stores as Linear weights ([C, C, 1, 1] <-> [C, C]).
_CONV_AS_LINEAR = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _compile(part: str) -> re.Pattern:
    pattern = re.escape(part).replace(r"\{i\}", r"(\d+)").replace(r"\{r\}", r"(\d+)")
    return re.compile(pattern if part.startswith(".") else "^" + pattern)


_PARTS = [(_compile(native), native, _compile(diffusers), diffusers) for native, diffusers in KEY_PARTS]


def _rename(key: str, levels: int, to_diffusers: bool) -> str:
    for native_re, native, diffusers_re, diffusers in _PARTS:
        src_re, src, dst = (native_re, native, diffusers) if to_diffusers else (diffusers_re, diffusers, native)
        match = src_re.search(key)
        if match:
            i = None
            if match.groups():
                n = int(match[1])
                i = levels - 1 - n if "{r}" in src else n
            key = key[: match.start()] + dst.format(i=i, r=None if i is None else levels - 1 - i) + key[match.end() :]
    return key


def diffusers_name(native: str, levels: int) -> str:
    """The diffusers name of a native (BFL) key of an autoencoder with `levels` resolution levels."""
    return _rename(native, levels, to_diffusers=True)


def native_name(diffusers: str, levels: int) -> str:
    """The native (BFL) name of a diffusers `AutoencoderKLFlux2` key."""
    return _rename(diffusers, levels, to_diffusers=False)


# AutoEncoderConfig field <-> diffusers config.json key, for the fields that are a plain rename.
_CONFIG_RENAMES = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "channels": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "z_channels": "latent_channels",
    "norm_groups": "norm_num_groups",
    "quant_conv": "use_quant_conv",
    "post_quant_conv": "use_post_quant_conv",
    "mid_attention": "mid_block_add_attention",
    "bn_eps": "batch_norm_eps",
    "bn_momentum": "batch_norm_momentum",
    "sample_size": "sample_size",
}


# ---- configs ----


def config_from_diffusers(d: Mapping) -> AutoEncoderConfig:
    """An `AutoEncoderConfig` from diffusers' `AutoencoderKLFlux2` config.json; unsupported variants raise."""
    cls = d.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise WeightsError(
            f"config.json describes a {cls}, not a FLUX.2 autoencoder ({DIFFUSERS_CLASS}); point at the FLUX.2 "
            f"model's `vae` folder"
        )
    # Start from diffusers' defaults (the real FLUX.2 AE): config.json may leave defaults out.
    fields = {ours: d[theirs] for ours, theirs in _CONFIG_RENAMES.items() if theirs in d}
    if "channels" in fields:
        fields["channels"] = tuple(fields["channels"])
    if isinstance(fields.get("sample_size"), (list, tuple)):  # diffusers tiles squares of the first entry
        fields["sample_size"] = fields["sample_size"][0]
    channels = fields.get("channels", AutoEncoderConfig.channels)
    problems = []
    if d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={d['act_fn']!r} (only 'silu')")
    if d.get("decoder_block_out_channels") not in (None, list(channels), tuple(channels)):
        problems.append("decoder_block_out_channels different from block_out_channels")
    down = d.get("down_block_types", ["DownEncoderBlock2D"] * len(channels))
    up = d.get("up_block_types", ["UpDecoderBlock2D"] * len(channels))
    if list(down) != ["DownEncoderBlock2D"] * len(channels) or list(up) != ["UpDecoderBlock2D"] * len(channels):
        problems.append(
            f"block types {list(down)} / {list(up)} (only one DownEncoderBlock2D/UpDecoderBlock2D per level)"
        )
    patch = tuple(d.get("patch_size", (2, 2)))
    if len(patch) != 2 or patch[0] != patch[1]:
        problems.append(f"patch_size={list(patch)} (only square patches)")
    if problems:
        raise WeightsError(f"unsupported {DIFFUSERS_CLASS} config: {'; '.join(problems)}")
    return AutoEncoderConfig(**fields, patch_size=patch[0])


def config_to_diffusers(config: AutoEncoderConfig) -> dict:
    """diffusers' `AutoencoderKLFlux2` config.json for `config`."""
    d = {theirs: getattr(config, ours) for ours, theirs in _CONFIG_RENAMES.items()}
    d["block_out_channels"] = list(config.channels)
    n = len(config.channels)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.42.1",
        **d,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "decoder_block_out_channels": None,
        "act_fn": "silu",
        "patch_size": [config.patch_size, config.patch_size],
    }


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], norm_groups: int = 32) -> AutoEncoderConfig:
    """Read an `AutoEncoderConfig` off native-named tensor shapes (a BFL single file has no config)."""
    try:
        channels = []
        while f"encoder.down.{len(channels)}.block.0.conv1.weight" in shapes:
            channels.append(shapes[f"encoder.down.{len(channels)}.block.0.conv1.weight"][0])
        num_res_blocks = 0
        while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in shapes:
            num_res_blocks += 1
        z_channels = shapes["decoder.conv_in.weight"][1]
        patch_size = math.isqrt(shapes["bn.running_mean"][0] // z_channels)
        config = AutoEncoderConfig(
            in_channels=shapes["encoder.conv_in.weight"][1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            channels=tuple(channels),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            norm_groups=norm_groups,
            quant_conv="encoder.quant_conv.weight" in shapes,
            post_quant_conv="decoder.post_quant_conv.weight" in shapes,
            mid_attention="encoder.mid.attn_1.q.weight" in shapes,
            patch_size=patch_size,
        )
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise WeightsError(f"cannot read the autoencoder's shape from its tensors (no usable {e})") from e
    if not channels or any(c % norm_groups for c in channels):
        raise WeightsError(
            f"autoencoder widths {channels} do not fit {norm_groups} GroupNorm groups; pass "
            f"config=AutoEncoderConfig(...) naming its norm_groups"
        )
    return config


# ---- loading ----


def _levels(diffusers_keys) -> int:
    levels = 0
    while f"encoder.down_blocks.{levels}.resnets.0.conv1.weight" in diffusers_keys:
        levels += 1
    return levels


def native_from_diffusers(tensors: Mapping[str, LazyTensor], levels: int) -> dict[str, LazyTensor]:
    """Rename diffusers-named tensors to native names, reshaping the attention Linears to 1x1 convs (lazily)."""
    out = {}
    for name, t in tensors.items():
        native = native_name(name, levels)
        if _CONV_AS_LINEAR.search(native) and len(t.shape) == 2:
            t = LazyTensor((*t.shape, 1, 1), t.dtype, lambda t=t: t.load()[:, :, None, None])
        out[native] = t
    return out


def diffusers_state_dict(ae: AutoEncoder) -> dict[str, torch.Tensor]:
    """`ae`'s weights under diffusers' names and shapes, ready for `AutoencoderKLFlux2.load_state_dict`."""
    levels = len(ae.config.channels)
    return {
        diffusers_name(k, levels): v[:, :, 0, 0] if _CONV_AS_LINEAR.search(k) else v for k, v in ae.state_dict().items()
    }


def _with_counter(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    if NUM_BATCHES_TRACKED not in tensors and "bn.running_mean" in tensors:
        tensors[NUM_BATCHES_TRACKED] = LazyTensor((), torch.int64, lambda: torch.zeros((), dtype=torch.int64))
    return tensors


def _require_flux2_stats(tensors: Mapping[str, LazyTensor], source: Path) -> None:
    if "bn.running_mean" not in tensors or "bn.running_var" not in tensors:
        raise WeightsError(
            f"{source} has no BatchNorm latent statistics (bn.running_mean / bn.running_var), so it is not a FLUX.2 "
            f"autoencoder (FLUX.1 and SD autoencoders lack them); use the FLUX.2 `{BFL_FILE}` or `vae` folder"
        )


def _single_file_tensors(path: Path) -> dict[str, LazyTensor]:
    """Native-named tensors of one file holding BFL or diffusers names, possibly under a prefix (`vae.`, ...)."""
    ckpt = open_checkpoint(path)
    prefixes = {k.removesuffix("encoder.conv_in.weight") for k in ckpt if k.endswith("encoder.conv_in.weight")}
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p) for p in sorted(prefixes))
        raise WeightsError(
            f"{path} does not hold exactly one autoencoder (prefixes of encoder.conv_in.weight found: {found}); "
            f"expected BFL's {BFL_FILE} or a diffusers {DIFFUSERS_CLASS} folder"
        )
    prefix = prefixes.pop()
    tensors = {k[len(prefix) :]: t for k, t in ckpt.lazy().items() if k.startswith(prefix)}
    _require_flux2_stats(tensors, path)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:  # a diffusers state dict saved as one file
        tensors = native_from_diffusers(tensors, _levels(tensors))
    return tensors


def _diffusers_folder(folder: Path) -> tuple[dict[str, LazyTensor], AutoEncoderConfig]:
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_path} is not a readable JSON config ({e})") from e
    config = config_from_diffusers(raw)
    # Prefer the plain weights when variants (e.g. `.fp16.safetensors`) sit next to them.
    weights = folder / DIFFUSERS_WEIGHTS
    index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    ckpt = open_checkpoint(index if index.is_file() else weights if weights.is_file() else folder)
    tensors = ckpt.lazy()
    _require_flux2_stats(tensors, folder)
    return native_from_diffusers(tensors, len(config.channels)), config


def load_autoencoder(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: AutoEncoderConfig | None = None,
) -> AutoEncoder:
    """Load a FLUX.2 autoencoder from a diffusers `vae` folder (or a pipeline folder holding one), a folder with
    BFL's `ae.safetensors`, or a single safetensors file with BFL or diffusers names (prefixes are stripped).

    `dtype=None` keeps the checkpoint's dtype. `config` overrides the config read from `config.json` or inferred
    from the tensor shapes (needed only for single files whose GroupNorm group count is not 32).
    """
    path = Path(path)
    expected = (
        f"a diffusers {DIFFUSERS_CLASS} folder (config.json + {DIFFUSERS_WEIGHTS}), a pipeline folder with a `vae` "
        f"subfolder, or BFL's {BFL_FILE}"
    )
    if not path.exists():
        raise MissingWeightsError(f"{path} does not exist; expected {expected}")
    if path.is_dir():
        if (path / "config.json").is_file():
            tensors, found = _diffusers_folder(path)
        elif (path / "vae" / "config.json").is_file():
            tensors, found = _diffusers_folder(path / "vae")
        elif (path / BFL_FILE).is_file():
            tensors = _single_file_tensors(path / BFL_FILE)
            found = None
        else:
            raise WeightsError(
                f"{path} is a folder without config.json, vae/config.json or {BFL_FILE}; expected {expected}"
            )
    else:
        tensors = _single_file_tensors(path)
        found = None
    if config is None:
        config = found or config_from_shapes({k: t.shape for k, t in tensors.items()})
    with torch.device("meta"):
        ae = AutoEncoder(config)
    return materialize(ae, _with_counter(tensors), device=device, dtype=dtype, source=path)


def save_autoencoder(ae: AutoEncoder, folder: str | os.PathLike) -> Path:
    """Write `ae` in diffusers layout (config.json + safetensors) that `AutoencoderKLFlux2.from_pretrained` opens."""
    folder = Path(folder)
    save_safetensors(
        diffusers_state_dict(ae), folder, weights_name=DIFFUSERS_WEIGHTS, config=config_to_diffusers(ae.config)
    )
    return folder
