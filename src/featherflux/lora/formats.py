"""FLUX.2 LoRA/LoKr files in every common key format -> parts on our native (BFL-named) modules, and back.

Formats read (detected from the keys):
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `lora_B.weight`; alpha from the safetensors
  metadata (`lora_adapter_metadata`: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), else alpha = rank.
  q/k/v LoRAs land on chunk 0/1/2 of our fused `qkv`; exact, no approximation.
- BFL / ai-toolkit / ComfyUI: `diffusion_model.<native module>.lora_A|lora_down.weight` (+ optional `.alpha`);
  `base_model.model.` (PEFT-wrapped) and bare native names too.
- kohya / musubi: `lora_unet_<native module with _>.lora_down|lora_up.weight` + `.alpha` (scale = alpha / rank).
- LoKr: `lokr_w1[_a|_b]`, `lokr_w2[_a|_b]` (+ `.alpha`, applied only when a factor is low-rank, as LyCORIS does)
  under any of the prefixes above, and LyCORIS' `lycoris_<diffusers or native module with _>`.

Quirk kept on purpose: diffusers' `norm_out.linear` stores (scale, shift) while BFL's `final_layer.adaLN_modulation.1`
stores (shift, scale), so a diffusers-named LoRA there gets its output halves swapped. diffusers itself does NOT swap
when it reads a BFL-named LoRA for that layer; we do the layout-correct thing for both.

Every key must be used; anything left over, for another model family, or mis-shaped is an error naming the keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from featherflux.errors import MissingWeightsError, WeightsError
from featherflux.model.config import DiTConfig

# diffusers module name -> (native module name, chunk of the native output rows as (index, count) or None)
DOUBLE_BLOCK_MAP = {
    "attn.to_q": ("img_attn.qkv", (0, 3)),
    "attn.to_k": ("img_attn.qkv", (1, 3)),
    "attn.to_v": ("img_attn.qkv", (2, 3)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 3)),
    "attn.add_k_proj": ("txt_attn.qkv", (1, 3)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 3)),
    "attn.to_qkv": ("img_attn.qkv", None),  # diffusers' fused projections (LoKr on fused qkv)
    "attn.to_added_qkv": ("txt_attn.qkv", None),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
SINGLE_BLOCK_MAP = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
}
GLOBAL_MAP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}  # native (shift, scale) vs diffusers (scale, shift)

LORA_SUFFIXES = {
    "lora_A.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class LoRAPart:
    """One low-rank delta `scale * up @ down` on `chunk` of a native module's output rows (None = all rows)."""

    module: str
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out_part, rank)
    scale: float
    chunk: tuple[int, int] | None
    source: str  # a key from the file, for error messages


@dataclass
class LoKrPart:
    """One Kronecker delta `scale * kron(w1, w2)`; each factor a matrix or a (a, b) low-rank pair."""

    module: str
    w1: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    w2: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    scale: float
    chunk: tuple[int, int] | None
    source: str

    def shape(self) -> tuple[int, int]:
        w1 = self.w1 if isinstance(self.w1, torch.Tensor) else self.w1[0] @ self.w1[1]
        w2 = self.w2 if isinstance(self.w2, torch.Tensor) else self.w2[0] @ self.w2[1]
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]


def native_linear_shapes(config: DiTConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear in the native DiT, by BFL module name."""
    d, mlp, t = config.hidden_size, config.mlp_hidden_dim, config.timestep_dim
    shapes = {
        "img_in": (d, config.in_channels),
        "txt_in": (d, config.context_in_dim),
        "time_in.in_layer": (d, t),
        "time_in.out_layer": (d, d),
        "double_stream_modulation_img.lin": (6 * d, d),
        "double_stream_modulation_txt.lin": (6 * d, d),
        "single_stream_modulation.lin": (3 * d, d),
        "final_layer.adaLN_modulation.1": (2 * d, d),
        "final_layer.linear": (config.in_channels, d),
    }
    if config.guidance_embed:
        shapes |= {"guidance_in.in_layer": (d, t), "guidance_in.out_layer": (d, d)}
    for i in range(config.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            shapes |= {
                f"{p}_attn.qkv": (3 * d, d),
                f"{p}_attn.proj": (d, d),
                f"{p}_mlp.0": (2 * mlp, d),
                f"{p}_mlp.2": (d, mlp),
            }
    for i in range(config.depth_single_blocks):
        shapes |= {f"single_blocks.{i}.linear1": (3 * d + 2 * mlp, d), f"single_blocks.{i}.linear2": (d, d + mlp)}
    return shapes


def diffusers_to_native(name: str) -> tuple[str, tuple[int, int] | None] | None:
    """diffusers module name -> (native name, chunk), or None if it is not a FLUX.2 Linear."""
    if name in GLOBAL_MAP:
        return GLOBAL_MAP[name], None
    m = re.fullmatch(r"(transformer_blocks|sformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
    if m is None:
        return None
    container, index, sub = m.groups()
    if container == "single_transformer_blocks":
        native = SINGLE_BLOCK_MAP.get(sub)
        return (f"single_blocks.{index}.{native}", None) if native else None
    if sub not in DOUBLE_BLOCK_MAP:
        return None
    native, chunk = DOUBLE_BLOCK_MAP[sub]
    return f"double_blocks.{index}.{native}", chunk


def native_to_diffusers(config: DiTConfig) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """native name -> the diffusers module(s) holding its rows (fused qkv -> q, k, v)."""
    out: dict[str, list] = {}
    for name in native_linear_shapes(config):
        m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", name)
        if m is None:
            out[name] = [(k, None) for k, v in GLOBAL_MAP.items() if v == name]
        elif m.group(1) == "single_blocks":
            out[name] = [
                (f"single_transformer_blocks.{m.group(2)}.{k}", None)
                for k, v in SINGLE_BLOCK_MAP.items()
                if v == m.group(3)
            ]
        else:
            split = [(k, c) for k, (v, c) in DOUBLE_BLOCK_MAP.items() if v == m.group(3) and c is not None]
            whole = [(k, c) for k, (v, c) in DOUBLE_BLOCK_MAP.items() if v == m.group(3) and c is None]
            out[name] = [(f"transformer_blocks.{m.group(2)}.{k}", c) for k, c in (split or whole)]
    return out


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a LoRA file (or a folder holding exactly one .safetensors)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise WeightsError(f"{path}: expected one .safetensors LoRA file in the folder, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise MissingWeightsError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"{path}: only .safetensors LoRA files are loaded (pickled .ckpt/.pt/.bin are unsafe); "
            "convert it to safetensors first"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
    except Exception as e:  # noqa: BLE001  (safetensors raises several error types for a corrupt header)
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def convert_lora(
    state_dict: dict[str, torch.Tensor], config: DiTConfig, metadata: dict[str, str] | None = None
) -> list[LoRAPart | LoKrPart]:
    """Parts on native modules for every module in the file; raises WeightsError rather than dropping a key."""
    if not state_dict:
        raise WeightsError("the LoRA file has no tensors")
    dora = [k for k in state_dict if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise WeightsError(f"DoRA adapters are not supported (keys such as {_first(dora)})")

    shapes = native_linear_shapes(config)
    underscore = _underscore_names(config)
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}  # (naming, module) -> suffix -> tensor
    unknown = []
    for key, tensor in state_dict.items():
        parsed = _parse_key(key, underscore)
        if parsed is None:
            unknown.append(key)
            continue
        naming, module, suffix = parsed
        groups.setdefault((naming, module), {})[suffix] = (key, tensor)
    if unknown:
        raise WeightsError(
            f"not a FLUX.2 LoRA: {len(unknown)} keys name no FLUX.2 Linear layer, e.g. "
            f"{_first(unknown)} (a LoRA for another model family, such as FLUX.1, cannot be used)"
        )

    alpha_for = _peft_alphas(metadata)
    parts, wrong = [], []
    for (naming, module), entries in groups.items():
        if naming == "diffusers":
            mapped = diffusers_to_native(module)
            native, chunk = mapped
        else:
            native, chunk = module, None
        if native not in shapes:
            wrong.append(f"{next(iter(entries.values()))[0]} (this model has no {native})")
            continue
        part = _make_part(native, chunk, entries, alpha_for(module) if naming == "diffusers" else None)
        if naming == "diffusers" and native in SWAPPED_HALVES:
            part = _swap_halves(part)
        out, inp = shapes[native]
        expected = (out // chunk[1] if chunk else out, inp)
        got = (part.up.shape[0], part.down.shape[1]) if isinstance(part, LoRAPart) else part.shape()
        if tuple(got) != expected:
            wrong.append(f"{part.source} (delta {tuple(got)}, layer {native} needs {expected})")
            continue
        parts.append(part)
    if wrong:
        raise WeightsError(
            f"LoRA does not fit this {config.hidden_size}-wide FLUX.2 model ({len(wrong)} layers): "
            + "; ".join(wrong[:3])
            + " (was it made for another model family?)"
        )
    return parts


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _underscore_names(config: DiTConfig) -> dict[str, tuple[str, str]]:
    """kohya/LyCORIS flattened names (dots -> underscores) -> (naming, dotted module name).

    Built for a deep model with every optional layer so that a LoRA for a bigger sibling is reported as mis-fitting
    rather than as not-FLUX.2."""
    config = replace(
        config,
        depth=max(config.depth, 64),
        depth_single_blocks=max(config.depth_single_blocks, 128),
        guidance_embed=True,
    )
    names = {n.replace(".", "_"): ("native", n) for n in native_linear_shapes(config)}
    for targets in native_to_diffusers(config).values():
        for diffusers, _ in targets:
            names[diffusers.replace(".", "_")] = ("diffusers", diffusers)
    for i in range(config.depth):  # diffusers' fused projections only exist as LoKr targets
        for sub in ("attn.to_qkv", "attn.to_added_qkv"):
            names[f"transformer_blocks_{i}_{sub.replace('.', '_')}"] = ("diffusers", f"transformer_blocks.{i}.{sub}")
    return names


def _parse_key(key: str, underscore: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """key -> (naming "native"|"diffusers", module name, suffix), or None when it is not a FLUX.2 LoRA key."""
    suffix = next((s for s in (*LORA_SUFFIXES, *LOKR_SUFFIXES) if key.endswith("." + s)), None)
    if suffix is None:
        return None
    body = key[: -len(suffix) - 1]
    for prefix in ("lora_unet_", "lycoris_", "lora_transformer_"):
        if body.startswith(prefix):
            found = underscore.get(body[len(prefix) :])
            return (*found, suffix) if found else None
    for prefix in ("transformer.", "diffusion_model.", "base_model.model.", "model.diffusion_model."):
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    if diffusers_to_native(body) is not None:
        return "diffusers", body, suffix
    if body.replace(".", "_") in underscore and underscore[body.replace(".", "_")] == ("native", body):
        return "native", body, suffix
    return None


def _peft_alphas(metadata: dict[str, str] | None):
    """module name -> alpha / rank function from diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return lambda module: None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise WeightsError("the LoRA file's lora_adapter_metadata is not valid JSON") from None
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    r, alpha = meta.get("r", 8), meta.get("lora_alpha", meta.get("r", 8))
    rank_pattern, alpha_pattern = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    rslora = bool(meta.get("use_rslora", False))

    def lookup(pattern: dict, module: str, default):
        # PEFT matches a pattern key against the end of the module path at a dot boundary
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def scale(module: str) -> float:
        rank, a = lookup(rank_pattern, module, r), lookup(alpha_pattern, module, alpha)
        return a / rank**0.5 if rslora else a / rank

    return scale


def _make_part(native, chunk, entries, peft_scale) -> LoRAPart | LoKrPart:
    source = min(key for key, _ in entries.values())
    tensors = {suffix: t for suffix, (_, t) in entries.items()}
    alpha = tensors.pop("alpha", None)
    alpha = float(alpha.float().item()) if alpha is not None else None
    if any(s.startswith("lokr_") for s in tensors):
        return _make_lokr_part(native, chunk, tensors, alpha, source)
    kinds = {LORA_SUFFIXES[s]: t for s, t in tensors.items()}
    if set(kinds) != {"down", "up"} or len(kinds) != len(tensors):
        raise WeightsError(
            f"incomplete LoRA pair for {source}: has {sorted(tensors)}, needs lora_A/lora_down and lora_B/lora_up"
        )
    down, up = kinds["down"], kinds["up"]
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise WeightsError(
            f"{source}: LoRA shapes {tuple(down.shape)} and {tuple(up.shape)} do not form a low-rank pair"
        )
    rank = down.shape[0]
    scale = peft_scale if peft_scale is not None else (alpha / rank if alpha is not None else 1.0)
    return LoRAPart(native, down, up, scale, chunk, source)


def _make_lokr_part(native, chunk, tensors, alpha, source) -> LoKrPart:
    def factor(name):
        if name in tensors:
            return tensors.pop(name)
        if f"{name}_a" in tensors and f"{name}_b" in tensors:
            return tensors.pop(f"{name}_a"), tensors.pop(f"{name}_b")
        raise WeightsError(f"incomplete LoKr factors for {source}: has {sorted(tensors)}")

    w1, w2 = factor("lokr_w1"), factor("lokr_w2")
    if tensors:
        raise WeightsError(f"unexpected LoKr keys next to {source}: {sorted(tensors)}")
    # LyCORIS scales by alpha / rank only when a factor is low-rank; full factors take no scale
    low_rank = w2[1].shape[0] if isinstance(w2, tuple) else w1[1].shape[0] if isinstance(w1, tuple) else None
    scale = alpha / low_rank if alpha is not None and low_rank is not None else 1.0
    return LoKrPart(native, w1, w2, scale, chunk, source)


def _swap_halves(part):
    if isinstance(part, LoRAPart):
        return LoRAPart(
            part.module, part.down, part.up.roll(part.up.shape[0] // 2, 0), part.scale, part.chunk, part.source
        )
    w1 = part.w1 if isinstance(part.w1, torch.Tensor) else part.w1[0] @ part.w1[1]
    if w1.shape[0] % 2:
        raise WeightsError(f"{part.source}: cannot reorder a LoKr on norm_out whose left factor has odd rows")
    return LoKrPart(part.module, w1.roll(w1.shape[0] // 2, 0), part.w2, part.scale, part.chunk, part.source)


# --- writing ------------------------------------------------------------------------------------------------------


def to_diffusers_state_dict(
    loras: dict[str, tuple[torch.Tensor, torch.Tensor]], config: DiTConfig, rank: int, alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Native {module: (down, up)} -> diffusers/PEFT keys + metadata; fused qkv splits exactly (down shared)."""
    targets = native_to_diffusers(config)
    out, names = {}, []
    for native, (down, up) in loras.items():
        if native in SWAPPED_HALVES:
            up = up.roll(up.shape[0] // 2, 0)
        for module, chunk in targets[native]:
            part_up = up.chunk(chunk[1], 0)[chunk[0]] if chunk else up
            out[f"transformer.{module}.lora_A.weight"] = down.clone()
            out[f"transformer.{module}.lora_B.weight"] = part_up.contiguous()
            names.append(module)
    meta = {
        "transformer.r": rank,
        "transformer.lora_alpha": alpha,
        "transformer.target_modules": sorted(names),
        "transformer.rank_pattern": {},
        "transformer.alpha_pattern": {},
        "transformer.init_lora_weights": True,
        "transformer.lora_dropout": 0.0,
        "transformer.use_dora": False,
        "transformer.use_rslora": False,
        "transformer.lora_bias": False,
    }
    return out, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def to_bfl_state_dict(loras: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """Native {module: (down, up)} -> `diffusion_model.` keys with alpha/rank baked into lora_B, so every reader
    (ComfyUI, ai-toolkit, diffusers) applies it at scale 1 without needing an `.alpha` key."""
    out = {}
    for native, (down, up) in loras.items():
        out[f"diffusion_model.{native}.lora_A.weight"] = down.contiguous()
        out[f"diffusion_model.{native}.lora_B.weight"] = (up * scale).contiguous()
    return out
