"""Attach LoRA/LoKr files to a native FLUX.2 transformer: load, stack, rescale, fuse, unfuse, unload.

These are functions on the transformer (`featherflux.model.dit.Flux2`); `Flux2Pipeline` calls them through
`lora.mixin.LoRAMixin`.
A targeted `nn.Linear` (or quantized Linear) is swapped for a `LoRALinear` that wraps it; unloading the last adapter
swaps the original module back, so the model's state dict is unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from featherflux.errors import UserError, WeightsError
from featherflux.lora.formats import LoKrPart, LoRAPart, convert_lora, read_lora_file
from featherflux.lora.layers import KroneckerPart, LoKrAdapter, LoRAAdapter, LoRALinear
from featherflux.model.swap import replace_module


def load_lora(
    model: nn.Module,
    path_or_state_dict: str | Path | dict[str, torch.Tensor],
    name: str | None = None,
    scale: float = 1.0,
    metadata: dict[str, str] | None = None,
) -> str:
    """Add the adapter(s) in a LoRA file to `model` under `name` (default: the file name); returns the name."""
    if isinstance(path_or_state_dict, dict):
        state_dict = path_or_state_dict
        name = name or f"lora_{len(lora_names(model))}"
    else:
        state_dict, metadata = read_lora_file(path_or_state_dict)
        name = name or Path(path_or_state_dict).stem
    if name in lora_names(model):
        raise UserError(f"a LoRA named {name!r} is already loaded; pass name= to load it under another name")
    if any(m.fused for _, m in lora_modules(model)):
        raise UserError("LoRAs are fused; call unfuse_lora() before loading another one")
    parts = convert_lora(state_dict, model.config, metadata)

    by_module: dict[str, list] = {}
    for part in parts:
        by_module.setdefault(part.module, []).append(part)
    adapters = {}
    for module_name, module_parts in by_module.items():
        base = _resolve(model, module_name)
        target = base.base if isinstance(base, LoRALinear) else base
        if (target.out_features, target.in_features) != _full_shape(module_parts, target):
            raise WeightsError(
                f"LoRA key {module_parts[0].source} does not fit {module_name} "
                f"({target.out_features}x{target.in_features})"
            )
        adapters[module_name] = _build_adapter(module_parts, target.out_features, _float_dtype(model), _device(target))
    for module_name, adapter in adapters.items():  # attach only after everything converted: never a partial load
        wrapped = _resolve(model, module_name)
        if not isinstance(wrapped, LoRALinear):
            wrapped = LoRALinear(wrapped)
            replace_module(model, module_name, wrapped)
        wrapped.add_adapter(name, adapter, scale)
    _sources(model)[name] = None if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
    return name


def set_loras(model: nn.Module, wanted: dict[str, tuple[str | Path, float]]) -> None:
    """Make exactly `wanted` ({name: (path, scale)}) active: load what is missing (a name whose file changed is
    reloaded), set the scales, and set every other loaded adapter to scale 0 (kept loaded, as a cache)."""
    if any(m.fused for _, m in lora_modules(model)):
        unfuse_lora(model)
    sources = _sources(model)
    for name, (path, _) in wanted.items():
        if name in sources and sources[name] != str(path):
            unload_lora(model, name)
        if name not in lora_names(model):
            load_lora(model, path, name=name)
    for name in lora_names(model):
        set_lora_scale(model, name, wanted[name][1] if name in wanted else 0.0)


def _sources(model: nn.Module) -> dict[str, str | None]:
    """name -> file of each loaded adapter, kept on the model so that set_loras can tell what is cached."""
    if not hasattr(model, "lora_sources"):
        model.lora_sources = {}
    return model.lora_sources


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield module_name, module


def lora_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, module in lora_modules(model):
        names.update(dict.fromkeys(module.names))
    return list(names)


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    _check_name(model, name)
    for _, module in lora_modules(model):
        if name in module.names:
            module.set_scale(name, scale)


def fuse_lora(model: nn.Module) -> None:
    """Bake every loaded adapter (at its current scale) into the base weights; the originals are kept."""
    modules = [m for _, m in lora_modules(model)]
    for module in modules:
        if not isinstance(module.base, nn.Linear):
            raise UserError("cannot fuse a LoRA into quantized weights; keep it unfused (it runs as a side branch)")
    for module in modules:
        module.fuse()


def unfuse_lora(model: nn.Module) -> None:
    """Restore the exact original weights; the adapters stay loaded and run as side branches again."""
    for _, module in lora_modules(model):
        module.unfuse()


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter (or all with name=None); layers left without adapters get their original module back."""
    if name is not None:
        _check_name(model, name)
    for module_name, module in list(lora_modules(model)):
        module.unfuse()
        for adapter in [a for a in module.names if name is None or a == name]:
            module.remove_adapter(adapter)
        if not module.adapters:
            replace_module(model, module_name, module.base)
    for loaded in list(_sources(model)):
        if name is None or loaded == name:
            del _sources(model)[loaded]


def _check_name(model, name):
    if name not in lora_names(model):
        raise UserError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(lora_names(model)) or 'none'}")


def _resolve(model: nn.Module, module_name: str) -> nn.Module:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise WeightsError(f"the model has no layer {module_name} for this LoRA") from None
    if not hasattr(module, "in_features"):
        raise WeightsError(f"{module_name} is not a Linear layer; a LoRA cannot target it")
    return module


def _full_shape(parts, target) -> tuple[int, int]:
    part = parts[0]
    out, inp = (part.up.shape[0], part.down.shape[1]) if isinstance(part, LoRAPart) else part.shape()
    return (out * part.chunk[1] if part.chunk else out), inp


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _device(module: nn.Module) -> torch.device:
    streamer = getattr(module, "streamer", None)  # a Linear streamed by sequential offload (memory.streaming)
    if streamer is not None:  # its weights wait on the host, but the adapter wraps it and runs on the device
        return streamer.device
    return next(module.parameters(), next(module.buffers(), torch.empty(0))).device


def _build_adapter(parts: list, out_features: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    if all(isinstance(p, LoKrPart) for p in parts):
        return LoKrAdapter([_lokr_module(p, out_features, dtype, device) for p in parts], out_features)
    if not all(isinstance(p, LoRAPart) for p in parts):
        raise WeightsError(f"{parts[0].module}: mixing LoRA and LoKr on one layer is not supported")
    if len(parts) == 1 and parts[0].chunk is None:
        p = parts[0]
        return LoRAAdapter(p.down.to(device, dtype), p.up.to(device, dtype), p.scale)
    # split parts (q, k, v) -> one pair: stacked downs and a block-diagonal up, the same map exactly
    same_scale = len({p.scale for p in parts}) == 1
    down = torch.cat([p.down for p in parts]).to(device, dtype)
    up = torch.zeros(out_features, down.shape[0], dtype=dtype, device=device)
    col = 0
    for p in parts:
        rows = _rows(p.chunk, out_features)
        block = p.up if same_scale else p.up.float() * p.scale
        up[rows, col : col + p.down.shape[0]] += block.to(device, dtype)
        col += p.down.shape[0]
    return LoRAAdapter(down, up, parts[0].scale if same_scale else 1.0)


def _rows(chunk: tuple[int, int] | None, out_features: int) -> slice:
    if chunk is None:
        return slice(0, out_features)
    size = out_features // chunk[1]
    return slice(chunk[0] * size, (chunk[0] + 1) * size)


def _lokr_module(part: LoKrPart, out_features: int, dtype, device) -> KroneckerPart:
    def cast(w):
        return tuple(t.to(device, dtype) for t in w) if isinstance(w, tuple) else w.to(device, dtype)

    return KroneckerPart(cast(part.w1), cast(part.w2), part.scale, _rows(part.chunk, out_features).start)
