"""Carrying out a `Plan`: where each component's weights live, and the moves at the pipeline's phase boundaries.

Notable features:
- `apply_placement(pipe, plan, device)` quantizes (if the plan says so), moves resident parts to the device, swaps
  streamed blocks or leaves for `StreamedModule`s and returns a `Placement`.
- Offloaded components move with an explicit `.to()` when their phase starts and back to the host when it ends:
  `with placement.phase("text_encoder"): ...`, then "dit", then "autoencoder". Nothing happens behind the
  pipeline's back.
- A text encoder that is streamed keeps its embedding and norms offloaded (moved in for the phase) and streams its
  decoder layers; one that is offloaded also goes back to the host once prompts are encoded.
- `fallback(pipe, placement)` undoes a placement and applies the next plan with a smaller peak, for the pipeline's
  out-of-memory handler.
- Each phase closes its component's streamer when it ends, so no streamed block or layer stays on the device into
  the next phase.
- Under a plan with `mmap` (weights memory-mapped by `featherflux.weights.io.mmap_safetensors`), streamed DiT
  blocks are not packed (they are copied through pinned staging buffers) and an offloaded component gets its
  mapped host tensors back after its phase (no copy into RAM).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from featherflux.memory.gguf import GGUFLinear
from featherflux.memory.planner import Plan
from featherflux.memory.quant import Float8Linear, Int8Linear, NF4Linear, fp8_matmul_available, quantize
from featherflux.memory.streaming import (
    DeviceLedger,
    Streamer,
    block_entries,
    leaf_entries,
    module_bytes,
    stream_modules,
    streamed_bytes,
    unstream,
)

PHASES = ("text_encoder", "dit", "autoencoder")
LINEAR_KINDS = (nn.Linear, Int8Linear, Float8Linear, NF4Linear, GGUFLinear)  # what sequential offload streams


@dataclass
class Placement:
    plan: Plan
    device: torch.device
    host: torch.device
    ledger: DeviceLedger
    offloaded: dict[str, nn.Module] = field(default_factory=dict)  # moved to the device only for their phase
    streamers: dict[str, Streamer] = field(default_factory=dict)
    entries: dict[str, list] = field(default_factory=dict)  # what was swapped, for `undo`
    fallbacks: list[Plan] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str):
        """Bring the component of this phase onto the device for the duration of the block."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        module = self.offloaded.get(name)
        nbytes = 0
        kept = _host_tensors(module) if module is not None and self.plan.mmap else None
        if module is not None:
            module.to(self.device)
            nbytes = _resident_bytes(module, self.streamers.get(name))
            self.ledger.add(nbytes)
        try:
            yield
        finally:
            if name in self.streamers:  # the prefetched block (and the device buffers) must not outlive the phase
                self.streamers[name].close()
            if kept is not None:  # frozen weights: put the mapped host tensors back instead of copying into RAM
                _restore(kept)
            elif module is not None:
                module.to(self.host)
            if module is not None:
                self.ledger.sub(nbytes)

    @contextmanager
    def carry(self, module: nn.Module, layers: nn.ModuleList):
        """Place a module used once, outside the pipeline's components (the whole text encoder, for caption
        upsampling), as the plan places the text encoder: `layers` streamed one ahead of use, or all of it moved in;
        back on the host after the block, for the caller to free."""
        entries = block_entries([layers]) if self.plan.text_encoder == "stream" else []
        # used once, so its layers are not packed: packing would cost more than it saves
        streamer = stream_modules(entries, self.device, (), self.ledger, pack=False) if entries else None
        module.to(self.device)  # streamed layers stay on the host; everything else comes in
        nbytes = _resident_bytes(module, streamer)
        self.ledger.add(nbytes)
        try:
            yield
        finally:
            unstream(entries)
            module.to(self.host)
            self.ledger.sub(nbytes)

    def undo(self, pipe) -> None:
        """Everything back to the host, streamed modules unwrapped (quantization stays)."""
        for entries in self.entries.values():
            unstream(entries)
        for module in _components(pipe).values():
            module.to(self.host)
        self.ledger.current = 0


def _host_tensors(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """Where each parameter's and buffer's current (host) tensor lives, to put it back after a phase."""
    kept = []
    for m in module.modules():
        kept += [(m._parameters, k, p.data) for k, p in m._parameters.items() if p is not None]
        kept += [(m._buffers, k, b) for k, b in m._buffers.items() if b is not None]
    return kept


def _restore(kept: list[tuple[dict, str, torch.Tensor]]) -> None:
    for table, key, tensor in kept:
        if isinstance(table[key], nn.Parameter):
            table[key].data = tensor
        else:
            table[key] = tensor


def _resident_bytes(module: nn.Module, streamer: Streamer | None) -> int:
    return module_bytes(module) - (streamed_bytes(streamer) if streamer else 0)


def _components(pipe) -> dict[str, nn.Module]:
    out = {"dit": pipe.transformer, "autoencoder": pipe.autoencoder}
    encoder_model = getattr(pipe.prompt_encoder, "model", None)  # a remote encoder has no local weights
    if isinstance(encoder_model, nn.Module):
        out["text_encoder"] = encoder_model
    return out


def apply_placement(
    pipe,
    plan: Plan,
    device: torch.device | str,
    ledger: DeviceLedger | None = None,
    fallbacks: list[Plan] = (),
    host: torch.device | str = "cpu",
) -> Placement:
    """Place `pipe.transformer`, `pipe.autoencoder` and the prompt encoder's model as `plan` says.

    `host` is where offloaded weights wait: the CPU, or the meta device when only the bytes are being counted."""
    device = torch.device(device)
    placement = Placement(plan, device, torch.device(host), ledger or DeviceLedger(), fallbacks=list(fallbacks))
    components = _components(pipe)
    if plan.quantize == "fp8" and device.type != "meta" and not fp8_matmul_available(device):
        warnings.warn(
            f"fp8 weights on {device} without fp8 tensor cores (CUDA compute capability 8.9+): they are dequantised "
            "to bf16 for each matmul, saving memory but not time",
            stacklevel=3,
        )
    if plan.quantize in ("int8", "fp8", "nf4"):  # GGUF plans come with their DiT already quantized
        for name in ("dit", "text_encoder"):  # a second call finds no Linear left to swap
            if name in components and not _quantized(components[name]):  # e.g. a DiT loaded from a BFL fp8 file
                quantize(components[name], plan.quantize)
    if plan.autoencoder_slicing:
        pipe.autoencoder.enable_slicing()
    if plan.autoencoder_tile:
        pipe.autoencoder.enable_tiling(plan.autoencoder_tile)
    modes = {"dit": plan.dit, "text_encoder": plan.text_encoder, "autoencoder": plan.autoencoder}
    for name, module in components.items():
        mode = modes[name]
        if mode in ("stream", "sequential"):
            if name == "dit" and mode == "stream":
                entries, resident = (
                    block_entries([module.double_blocks, module.single_blocks]),
                    plan.dit_resident_blocks,
                )
            elif name == "dit":
                entries, resident = leaf_entries(module, LINEAR_KINDS), ()
            else:
                entries, resident = block_entries([module.layers]), ()
            pack = not (plan.mmap and name == "dit")  # packing would read all mapped weights into RAM
            placement.streamers[name] = stream_modules(entries, device, resident, placement.ledger, pack=pack)
            placement.entries[name] = entries
        if mode == "offload" or (name == "text_encoder" and mode == "stream"):
            module.to(host)
            placement.offloaded[name] = module
        else:
            module.to(device)
            placement.ledger.add(_resident_bytes(module, placement.streamers.get(name)))
    return placement


def _quantized(module: nn.Module) -> bool:
    return any(isinstance(m, LINEAR_KINDS[1:]) for m in module.modules())


def fallback(pipe, placement: Placement) -> Placement | None:
    """After a device out-of-memory error: the next plan with a smaller peak, applied, or None if there is none."""
    smaller = [
        p
        for p in placement.fallbacks
        if p.peak_vram_bytes < placement.plan.peak_vram_bytes and p.quantize == placement.plan.quantize
    ]
    if not smaller:
        return None
    nxt, rest = smaller[0], smaller[1:]
    warnings.warn(
        f"out of device memory with offload={placement.plan.offload!r} (expected peak {placement.plan.peak_vram_gib:.1f} "
        f"GiB); falling back to offload={nxt.offload!r} (expected peak {nxt.peak_vram_gib:.1f} GiB)",
        stacklevel=2,
    )
    placement.undo(pipe)
    if placement.device.type == "cuda":
        torch.cuda.empty_cache()
    return apply_placement(pipe, nxt, placement.device, placement.ledger, rest, placement.host)
