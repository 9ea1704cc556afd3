"""The planner: from a VRAM and RAM budget to the fastest placement of text encoder, DiT and autoencoder that fits.

Design:
- Everything is computed from the configs (`memory.sizes`): no weights are read, so `featherflux plan` works
  before anything is downloaded.
- A plan gives each component a placement: `resident` (on the device for the whole session), `offload` (moved to
  the device for its phase, back to the host after), `stream` (a set of resident blocks; the rest are copied in
  from pinned host memory one block ahead of use) or `sequential` (every leaf Linear streamed, nothing resident).
- Device peak = persistent bytes (resident components and streamed components' resident blocks) + the largest
  phase transient (the offloaded component of that phase or the two in-flight streamed blocks, plus that phase's
  activations) + a reserve for the CUDA context and allocator fragmentation.

Speed model (why the ranking is what it is). Per DiT step, compute takes C = FLOPs / throughput and a streamed
plan must copy T = streamed bytes / host-to-device bandwidth. The copy of block i+1 runs on a side stream while
block i computes, so a streamed step takes about max(C, T). For a linear layer the ratio C/T per weight byte is
(2 * tokens / 2 bytes) / throughput * bandwidth = tokens * bandwidth / throughput. With 4608 tokens (1024² plus
512 text tokens), PCIe 4.0 (~22 GB/s pinned) and ~150 dense bf16 TFLOP/s (an RTX 4090) that is ~0.7: streaming
*everything* would be ~1.4x slower than compute, but with a third of the blocks resident the copy hides behind
compute. So on a 24 GiB card, bf16 dev with ~19 GiB of resident blocks runs at ~1.0-1.1x the fully resident
speed with exact output, while int8/fp8 weights (32 GB) still do not fit resident and only halve a copy that is
already hidden. Quantization wins when the copy is *not* hidden: small budgets (8-12 GiB), slow links
(PCIe 3.0, x8 slots), small images (fewer tokens per weight byte), or when it turns a streamed plan into a
resident one. Leaf-level sequential offload copies everything every step in small pieces (poorer overlap,
modelled at 60% link efficiency) and is the last resort. fp8 layers on cards with fp8 tensor cores multiply in
fp8 at the card's fp8 rate; every other quantized layer writes a bf16 copy of its weight per call (about 4 bytes
of device-memory traffic per weight per step, a few percent) and the largest such copy is part of the DiT phase's
peak. Throughputs come from `memory.hardware` (the card's datasheet, or measured).

Ranking: quality first. When the unquantized DiT fits on the device (the text encoder may be swapped out between
phases), the plans that keep the checkpoint's precision come first, however fast a quantized one would be. Only
when it does not fit are plans ranked by expected seconds per image (steps x step time + per-image encoder/decoder
work and transfers) scaled by a quality factor (1.0 bf16, 1.3 int8/fp8, 1.6 nf4), so a quantized plan is chosen
only if it is clearly faster than streaming (or the only one that fits), and its explanation says what the
unquantized plan would have cost.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace

from featherflux.errors import UserError
from featherflux.memory import sizes
from featherflux.memory.hardware import GiB, Hardware, detect_hardware, host_ram_bytes
from featherflux.model.config import FAMILIES, FamilyConfig

OFFLOAD_MODES = (None, "model", "blocks", "sequential")
QUANTIZE_MODES = (None, "none", "int8", "fp8", "nf4")  # None and "none" both forbid quantization; "auto" plans it
QUALITY_FACTOR = {None: 1.0, "int8": 1.3, "fp8": 1.3, "nf4": 1.6}
HOST_OVERHEAD = 3 * GiB  # Python, torch, tokenizers, page tables
SEQUENTIAL_LINK_EFFICIENCY = 0.6


@dataclass(frozen=True)
class Plan:
    family: str
    offload: str | None  # the user-facing mode: None (all resident), "model", "blocks", "sequential"
    quantize: str | None  # Linear weights of the DiT and the text encoder
    text_encoder: str  # "resident" | "offload" | "stream"
    dit: str  # "resident" | "offload" | "stream" | "sequential"
    autoencoder: str  # "resident" | "offload"
    dit_resident_blocks: tuple[int, ...]  # execution-order indices (double blocks first) kept on the device
    dit_blocks: int
    mmap: bool  # weights memory-mapped from disk because the host cannot hold them
    vram_budget_bytes: int
    peak_vram_bytes: int
    host_bytes: int
    seconds_per_step: float
    copy_seconds_per_step: float  # host-to-device copies of a streamed DiT step (overlapping compute)
    seconds_per_image: float
    fits: bool
    pinned_bytes: int = 0  # page-locked host memory: packed streamed blocks and layers, or the staging buffers
    dit_peak_bytes: int = 0  # device bytes of the DiT alone while it denoises (its weights there + activations)
    # How the autoencoder decodes when a whole batch at once does not fit: one image at a time (same images), then
    # in tiles of this many pixels (diffusers' tiled decode: slightly different seams). None: the whole image.
    autoencoder_slicing: bool = False
    autoencoder_tile: int | None = None
    tensor_parallel: int = 1  # GPUs that each hold 1/N of every DiT block (featherflux.parallel.tensor)
    explanation: str = ""

    @property
    def peak_vram_gib(self) -> float:
        return self.peak_vram_bytes / GiB

    def to_json(self) -> str:
        d = asdict(self)
        d["dit_resident_blocks"] = len(self.dit_resident_blocks)
        d["peak_vram_gib"] = round(self.peak_vram_gib, 2)
        d["vram_budget_gib"] = round(self.vram_budget_bytes / GiB, 2)
        d["host_gib"] = round(self.host_bytes / GiB, 2)
        d["pinned_gib"] = round(self.pinned_bytes / GiB, 2)
        return json.dumps(d, indent=2)


def parse_bytes(value: str | float | None, what: str = "memory") -> int | None:
    """`24`, `24GiB`, `24G`, `24GB` (10^9), `512MiB`, `24.5` -> bytes. A bare number means GiB."""
    if value is None or isinstance(value, int) and not isinstance(value, bool) and value > 1 << 20:
        return value
    if isinstance(value, (int, float)):
        return int(value * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(value).lower())
    if not m:
        raise UserError(f"cannot read {what} {value!r}; write a number of GiB such as 24 or 24GiB, or 512MiB")
    unit = {None: GiB, "g": GiB, "gib": GiB, "gb": 10**9, "m": 2**20, "mib": 2**20, "mb": 10**6}
    unit |= {"t": 2**40, "tib": 2**40, "tb": 10**12}
    return int(float(m.group(1)) * unit[m.group(2)])


# ---------------------------------------------------------------------------------------------------- planning


def pick_resident_blocks(block_bytes: list[int], budget: int) -> tuple[int, ...]:
    """As many blocks as fit in `budget`, spread evenly through the execution order.

    Spreading them lets the copy of the next streamed block run while resident blocks compute, so the copy
    engine never idles for long stretches.
    """
    n = len(block_bytes)
    avg = sum(block_bytes) / max(n, 1)
    k = min(n, int(budget // avg)) if avg else n
    while k > 0:
        chosen = tuple(sorted({int((i + 0.5) * n / k) for i in range(k)}))
        if sum(block_bytes[i] for i in chosen) <= budget:
            return chosen
        k -= 1
    return ()


@dataclass(frozen=True)
class _Sizes:
    """Bytes and seconds of one family at one quantization and resolution."""

    dit: int
    dit_globals: int
    dit_blocks: list[int]
    dit_largest_leaf: int
    te: int
    te_layer: int
    te_other: int
    ae: int
    act_dit: int
    act_te: int
    act_ae: int  # decoding the whole batch at once
    # (slicing, tile, activation bytes) from the exact way to the leanest: whole batch, one image at a time, then
    # ever smaller tiles
    decode_options: tuple[tuple[bool, int | None, int], ...]
    dit_compute_s: float
    dequant_temp: int  # the largest per-call dequantised weight (and its fp32 intermediate) of a quantized layer
    te_compute_s: float
    ae_compute_s: float


# Link between the GPUs of a tensor-parallel plan: PCIe 4.0 x16 as a 4 x 24 GB workstation has it, measured
# all-reduce bandwidth rather than the 32 GB/s line rate. NVLink machines are ten times faster; planning for the
# slow link keeps the choice honest where it matters.
TENSOR_LINK_GBPS = 20.0


def _sizes(
    family: FamilyConfig, quant: str | None, hw: Hardware, height: int, width: int, batch: int, tensor: int = 1
) -> _Sizes:
    img_tokens = (height // 16) * (width // 16)
    dit_batch = batch if family.guidance_distilled else 2 * batch  # true CFG runs the DiT on the empty prompt too
    txt = family.text_encoder.max_length
    dw = sizes.dit_weights(family.dit)
    te = sizes.text_encoder_weights(family.text_encoder)
    te_layer = sizes.text_encoder_layer_weights(family.text_encoder)
    flops = hw.tflops * 1e12
    dit_flops = sizes.dit_step_flops(family.dit, img_tokens, txt, dit_batch)
    d, m = family.dit.hidden_size, family.dit.mlp_hidden_dim
    if quant == "fp8" and hw.fp8_matmul:  # Float8Linear multiplies on the fp8 tensor cores; attention stays bf16
        attention = sizes.dit_attention_flops(family.dit, img_tokens, txt, dit_batch)
        dit_compute_s = (dit_flops - attention) / (hw.fp8_tflops * 1e12) + attention / flops
        dequant_temp = 0
    else:  # every other quantized layer writes a bf16 copy of its weight per call, then multiplies in bf16
        dit_compute_s = dit_flops / flops + (dw.total.linear * 4 / (hw.hbm_gbps * 1e9) if quant else 0.0)
        # the largest Linear (single block linear1); GGUF's torch kernels go through fp32 before the bf16 copy
        dequant_temp = d * (3 * d + 2 * m) * (0 if not quant else 2 if quant in QUANTIZE_MODES else 6)
    te_quant = quant if quant in QUANTIZE_MODES else None  # a GGUF file quantizes only the DiT
    blocks = [b // tensor for b in dw.block_bytes(quant)]
    if tensor > 1:  # each GPU runs 1/N of every block, then an all-reduce per block half over the link
        tokens = (img_tokens + txt) * dit_batch
        reduced = 2 * family.dit.depth + family.dit.depth_single_blocks  # (B, S, D) bf16 sums per step
        dit_compute_s = dit_compute_s / tensor + reduced * tokens * d * 2 * 2 * (tensor - 1) / tensor / (
            TENSOR_LINK_GBPS * 1e9
        )
    return _Sizes(
        dit=dw.globals.nbytes(quant) + sum(blocks),
        dit_globals=dw.globals.nbytes(quant),
        dit_blocks=blocks,
        dit_largest_leaf=int(d * (3 * d + 2 * m) * sizes.QUANT_BYTES[quant]) // tensor,
        te=te.nbytes(te_quant),
        te_layer=te_layer.nbytes(te_quant),
        te_other=te.nbytes(te_quant) - family.text_encoder.layers_needed * te_layer.nbytes(te_quant),
        ae=sizes.autoencoder_weights(family.autoencoder).nbytes(),
        act_dit=sizes.dit_activation_bytes(family.dit, img_tokens, txt, dit_batch),
        act_te=sizes.text_encoder_activation_bytes(family.text_encoder, txt, batch),
        act_ae=sizes.autoencoder_activation_bytes(family.autoencoder, height, width, batch),
        decode_options=_decode_options(family, height, width, batch),
        dit_compute_s=dit_compute_s,
        dequant_temp=dequant_temp,
        te_compute_s=sizes.text_encoder_flops(family.text_encoder, txt, batch) / flops,
        ae_compute_s=sizes.autoencoder_decode_flops(family.autoencoder, height, width) * batch / flops,
    )


DECODE_TILES = (1024, 512, 256)  # pixels; tried in this order when one image does not decode whole


def _decode_options(family: FamilyConfig, height: int, width: int, batch: int) -> tuple:
    ae = family.autoencoder
    images = batch * 3 * height * width * 4  # the decoded batch, kept while the rest is decoded
    options = [(False, None, sizes.autoencoder_activation_bytes(ae, height, width, batch))]
    if batch > 1:
        options.append((True, None, sizes.autoencoder_activation_bytes(ae, height, width) + images))
    for tile in DECODE_TILES:
        if tile < max(height, width):  # smaller images are decoded whole even with tiling on
            act = sizes.autoencoder_activation_bytes(ae, min(tile, height), min(tile, width))
            options.append((True, tile, act + 2 * images))  # the overlapping output tiles, then the blended image
    return tuple(options)


def _evaluate(
    family, s: _Sizes, hw: Hardware, offload, quant, te, dit, ae, resident: tuple[int, ...], steps: int
) -> Plan:
    resident_bytes = sum(s.dit_blocks[i] for i in resident)
    persistent = {"resident": s.te}.get(te, 0) + {"resident": s.ae}.get(ae, 0)
    persistent += {"resident": s.dit, "stream": s.dit_globals + resident_bytes}.get(dit, 0)
    te_phase = {"resident": 0, "offload": s.te, "stream": s.te_other + 2 * s.te_layer}[te] + s.act_te
    dit_phase = {
        "resident": 0,
        "offload": s.dit,
        "stream": 2 * max(s.dit_blocks),
        "sequential": 2 * s.dit_largest_leaf,
    }[dit]
    dit_phase += s.act_dit + s.dequant_temp
    ae_weights = {"resident": 0, "offload": s.ae}[ae]
    # the first way of decoding that fits, else the leanest; a plan never tiles an image it can decode whole
    slicing, tile, act_ae = next(
        (o for o in s.decode_options if persistent + ae_weights + o[2] + hw.reserve_bytes <= hw.vram_bytes),
        s.decode_options[-1],
    )
    ae_phase = ae_weights + act_ae
    peak = persistent + max(te_phase, dit_phase, ae_phase) + hw.reserve_bytes

    dit_host = {"resident": 0, "offload": s.dit, "stream": s.dit - s.dit_globals - resident_bytes, "sequential": s.dit}[
        dit
    ]
    step_host = HOST_OVERHEAD + dit_host + (s.ae if ae != "resident" else 0)  # touched every step
    host = step_host + (s.te if te != "resident" else 0)  # the text encoder is touched once per prompt
    mmap = host > hw.ram_bytes
    if mmap:  # mapped blocks are not packed: two staging buffers of the largest streamed unit are pinned instead
        dit_pinned = 2 * {"stream": max(s.dit_blocks), "sequential": s.dit_largest_leaf}.get(dit, 0)
    else:
        dit_pinned = {"stream": dit_host, "sequential": s.dit}.get(dit, 0)
    pinned = dit_pinned + (s.te - s.te_other if te == "stream" else 0)
    link = hw.h2d_gbps * 1e9
    streamed = {"stream": dit_host, "sequential": s.dit}.get(dit, 0)
    copy_s = streamed / link / (SEQUENTIAL_LINK_EFFICIENCY if dit == "sequential" else 1.0)
    if step_host > hw.ram_bytes:  # what does not fit in the page cache is read from disk again every step
        copy_s += min(step_host - hw.ram_bytes, streamed) / (hw.disk_gbps * 1e9)
    step = max(s.dit_compute_s, copy_s) * (1.02 if streamed else 1.0)
    per_image = (
        s.te_compute_s
        + s.ae_compute_s
        + (s.te / link if te != "resident" else 0)
        + (s.ae / link if ae != "resident" else 0)
    )
    per_image += s.dit / link if dit == "offload" else 0.0
    if mmap:  # denoising evicted the text encoder's pages: a new prompt reads it from disk again
        per_image += (s.te if te != "resident" else 0) / (hw.disk_gbps * 1e9)
    if dit == "stream" and len(resident) == len(s.dit_blocks):
        dit = "resident"
    return Plan(
        family=family.name,
        offload=offload,
        quantize=quant,
        text_encoder=te,
        dit=dit,
        autoencoder=ae,
        dit_resident_blocks=resident,
        dit_blocks=len(s.dit_blocks),
        mmap=mmap,
        vram_budget_bytes=hw.vram_bytes,
        peak_vram_bytes=peak,
        host_bytes=host,
        seconds_per_step=step,
        copy_seconds_per_step=copy_s,
        seconds_per_image=steps * step + per_image,
        fits=peak <= hw.vram_bytes,
        pinned_bytes=pinned,
        dit_peak_bytes={"resident": s.dit, "stream": s.dit_globals + resident_bytes}.get(dit, 0) + dit_phase,
        autoencoder_slicing=slicing,
        autoencoder_tile=tile,
    )


def _candidates(family, s: _Sizes, hw: Hardware, offload, quant, steps: int) -> Plan:
    """The best plan of one (offload mode, quantization) pair."""

    def ev(te, dit, ae, resident=()):
        return _evaluate(family, s, hw, offload, quant, te, dit, ae, resident, steps)

    if offload is None:
        return ev("resident", "resident", "resident")
    if (
        offload == "model"
    ):  # everything offloaded, then keep what still fits resident, the DiT first (it runs every step)
        placement = {"dit": "offload", "ae": "offload", "te": "offload"}
        for part in ("dit", "ae", "te"):
            trial = placement | {part: "resident"}
            if ev(trial["te"], trial["dit"], trial["ae"]).fits:
                placement = trial
        return ev(placement["te"], placement["dit"], placement["ae"])
    if offload == "blocks":
        base = ev("stream", "stream", "offload")
        spare = hw.vram_bytes - base.peak_vram_bytes
        return ev("stream", "stream", "offload", pick_resident_blocks(s.dit_blocks, max(spare, 0)))
    return ev("stream", "sequential", "offload")


def _explain(p: Plan, family: FamilyConfig, s: _Sizes, hw: Hardware, height: int, width: int) -> str:
    q = p.quantize or "bf16"
    cards = f" per GPU, tensor parallel over {p.tensor_parallel} GPUs" if p.tensor_parallel > 1 else ""
    lines = [
        (
            f"{family.name} at {width}x{height} with {hw.vram_bytes / GiB:.0f} GiB VRAM{cards} and "
            f"{hw.ram_bytes / GiB:.0f} GiB RAM{' for rank 0' if cards else ''}:"
        ),
        (
            f"weights in {q}: DiT {s.dit / GiB:.1f} GiB, text encoder {s.te / GiB:.1f} GiB (trimmed to "
            f"{family.text_encoder.layers_needed} of {family.text_encoder.num_layers} layers), "
            f"autoencoder {s.ae / GiB:.2f} GiB."
        ),
    ]
    if p.tensor_parallel > 1:
        lines.append(
            f"Each GPU holds 1/{p.tensor_parallel} of every DiT block ({s.dit / GiB:.1f} GiB with the whole "
            f"embedders and modulation) and the GPUs sum each block half with one all-reduce (planned at "
            f"{TENSOR_LINK_GBPS:.0f} GB/s, a PCIe link)."
        )
    if p.dit == "resident" and p.text_encoder == "resident":
        lines.append("Everything stays on the device: nothing moves between phases.")
    if p.dit == "resident" and p.text_encoder != "resident":
        lines.append(
            f"DiT stays on the device; the text encoder is {'moved in' if p.text_encoder == 'offload' else 'streamed in layer by layer'} "
            "only to encode a prompt, then moved back to the host."
        )
    if p.dit == "offload":
        lines.append(
            f"One component on the device at a time: the DiT ({s.dit / GiB:.1f} GiB) is moved in for denoising "
            f"and out again, {s.dit / (hw.h2d_gbps * 1e9):.1f} s of copying per image."
        )
    if p.dit == "stream":
        k = len(p.dit_resident_blocks)
        lines.append(
            f"The DiT does not fit next to its activations, so {k} of {p.dit_blocks} blocks stay on the device and the "
            f"other {p.dit_blocks - k} are copied in from pinned host memory one block ahead of use; the text encoder "
            f"is streamed layer by layer when a prompt is encoded ({p.pinned_bytes / GiB:.1f} GiB of host memory "
            "pinned)."
        )
    if p.dit == "sequential":
        lines.append(
            "Only the largest single layers fit: every Linear is copied in right before use (sequential offload)."
        )
    if p.dit in ("stream", "sequential"):
        bound = (
            "copy-bound"
            if p.copy_seconds_per_step > s.dit_compute_s
            else "compute-bound: the copies hide behind compute"
        )
        lines.append(
            f"Expected {p.seconds_per_step:.2f} s/step vs {s.dit_compute_s:.2f} s/step fully resident "
            f"({p.copy_seconds_per_step:.2f} s of copies per step, {bound})."
        )
    else:
        lines.append(f"Expected {p.seconds_per_step:.2f} s/step.")
    if p.mmap:
        lines.append(
            f"The host needs {p.host_bytes / GiB:.0f} GiB for the weights off the device, more than its RAM, "
            "so weights are memory-mapped from disk and re-read as needed (slower)."
        )
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(
        f"Peak {p.peak_vram_gib:.1f} GiB of {hw.vram_bytes / GiB:.0f} GiB VRAM (incl. "
        f"{hw.reserve_bytes / GiB:.1f} GiB reserve): {verdict}."
    )
    if p.autoencoder_slicing:
        how = f"in {p.autoencoder_tile}-pixel tiles" if p.autoencoder_tile else "one image at a time"
        lines.append(
            f"Decoding the whole {'batch' if p.autoencoder_tile is None else 'image'} at once would take "
            f"{s.act_ae / GiB:.1f} GiB, so the autoencoder decodes {how}"
            + (" (tiles blend at their seams, as diffusers' enable_tiling does)." if p.autoencoder_tile else ".")
        )
    if p.quantize == "fp8" and hw.fp8_matmul:
        lines.append("fp8 weights multiply on the fp8 tensor cores (activations quantized per token).")
    elif p.quantize:
        lines.append(f"{q} weights dequantise to bf16 per layer, one layer at a time.")
    return " ".join(lines)


def plans(
    family: FamilyConfig | str,
    vram: str | float | None = None,
    ram: str | float | None = None,
    *,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    offload: str | None = "auto",
    quantize: str | None = "auto",
    file_quantization: str | None = None,
    hardware: Hardware | None = None,
    tensor_degrees: tuple[int, ...] = (1,),
) -> list[Plan]:
    """All candidate plans for a family (or a family's name), best first: the fitting ones ranked by expected time x
    quality factor, then the rest by peak. `offload` / `quantize` = "auto" lets the planner choose; any other value
    (None included) fixes it. `file_quantization` is the format of a DiT file that is quantized already ("fp8",
    "q4_k"...); it fixes the quantization. `tensor_degrees` are the GPU counts to plan for, each GPU holding 1/N of
    every DiT block (`featherflux.parallel.tensor`): (1,) plans one card, (1, 4) also weighs tensor parallelism
    over 4 cards against it, (4,) plans one rank of a 4-way tensor-parallel run. (`featherflux.loading.
    resolve_family` finds the family of a folder, a file or a hub id.)"""
    family = _family(family)
    file_quant = file_quantization
    hw = hardware or detect_hardware()
    if vram is not None or hw is None:
        if vram is None:
            raise UserError("no CUDA device found: give the VRAM budget, e.g. --vram 24 (GiB)")
        ram_b = parse_bytes(ram, "RAM") if ram is not None else (hw.ram_bytes if hw else host_ram_bytes())
        hw = (
            replace(hw, vram_bytes=parse_bytes(vram, "VRAM"), ram_bytes=ram_b)
            if hw
            else Hardware(parse_bytes(vram, "VRAM"), ram_b)
        )
    elif ram is not None:
        hw = replace(hw, ram_bytes=parse_bytes(ram, "RAM"))
    if offload != "auto" and offload not in OFFLOAD_MODES:
        raise UserError(f"unknown offload mode {offload!r}; use one of model, blocks, sequential (or leave it unset)")
    if file_quant:
        quants = [file_quant]
    elif quantize == "auto":
        quants = [None, "fp8" if hw.fp8_matmul else "int8", "nf4"]
    elif quantize in (None, "none"):
        quants = [None]
    elif quantize in QUANTIZE_MODES or quantize in sizes.QUANT_BYTES:  # the latter: a GGUF file's format
        quants = [quantize]
    else:
        raise UserError(f"unknown quantization {quantize!r}; use one of none, int8, fp8, nf4 (or leave it unset)")
    offloads = OFFLOAD_MODES if offload == "auto" else (offload,)
    out = []
    for tensor in tensor_degrees:
        # tensor parallelism slices plain weights: it keeps the checkpoint's precision, and takes no quantized file
        for quant in quants if tensor == 1 else [None] * (not file_quant and None in quants):
            # rank 0 (planned here) shares the host with the other ranks; only it holds the text encoder
            rank_hw = replace(hw, ram_bytes=hw.ram_bytes - (tensor - 1) * HOST_OVERHEAD)
            s = _sizes(family, quant, rank_hw, height, width, batch, tensor)
            for mode in offloads:
                p = _candidates(family, s, rank_hw, mode, quant, family.default_steps)
                p = replace(p, tensor_parallel=tensor)
                out.append(replace(p, explanation=_explain(p, family, s, rank_hw, height, width)))
    if not out:
        raise UserError(
            "tensor parallelism slices the checkpoint's own weights: it takes neither quantize= nor a quantized "
            "(GGUF / fp8) DiT file; use a context mode (ulysses, ring, usp) with those"
        )
    # A tiled decode changes the image at the seams, so a plan tiles only when no plan can decode the image whole.
    fitting = sorted(
        (p for p in out if p.fits),
        key=lambda p: (p.autoencoder_tile is not None, p.seconds_per_image * QUALITY_FACTOR.get(p.quantize, 1.6)),
    )
    unquantized = [p for p in fitting if p.quantize is None]
    if quantize == "auto" and any(p.dit == "resident" for p in unquantized):
        # Quality first: quantizing trades quality, so it is never chosen only to go faster.
        fitting = unquantized + [p for p in fitting if p.quantize is not None]
    elif quantize == "auto" and not file_quant and fitting and fitting[0].quantize is not None:
        fitting[0] = replace(fitting[0], explanation=fitting[0].explanation + " " + _why_quantized(out, hw))
    if quantize == "none" and not fitting:
        raise UserError(_unquantized_does_not_fit(family, out, hw, height, width, batch, offload))
    return fitting + sorted((p for p in out if not p.fits), key=lambda p: p.peak_vram_bytes)


def _smallest_budget(p: Plan, hw: Hardware) -> int:
    """The least VRAM with which this plan fits: its peak grows with the budget only through the reserve."""
    return int((p.peak_vram_bytes - hw.reserve_bytes + 0.75 * GiB) / 0.96) + 1


def _why_quantized(candidates: list[Plan], hw: Hardware) -> str:
    unquantized = [p for p in candidates if p.quantize is None]
    fitting = [p for p in unquantized if p.fits]
    if fitting:
        best = min(fitting, key=lambda p: p.seconds_per_image)
        return (
            f"Quantized because the unquantized DiT does not fit on the device with its activations; the best "
            f"unquantized plan (offload={best.offload}, DiT {best.dit}) would take {best.seconds_per_step:.2f} s/step, "
            f"{best.seconds_per_image:.0f} s/image. Pass quantize='none' (--quantize none) to run it."
        )
    least = min(_smallest_budget(p, hw) for p in unquantized)
    return f"Quantized because no unquantized plan fits: the smallest needs {least / GiB:.1f} GiB of VRAM."


def _unquantized_does_not_fit(family, unquantized: list[Plan], hw: Hardware, height, width, batch, offload) -> str:
    least = min(unquantized, key=lambda p: _smallest_budget(p, hw))
    need = _smallest_budget(least, hw) / GiB
    quantized = [
        p for p in plans(family, hardware=hw, height=height, width=width, batch=batch, offload=offload) if p.quantize
    ]
    alternatives = "; ".join(
        f"quantize={p.quantize} offload={p.offload} (peak {p.peak_vram_gib:.1f} GiB, {p.seconds_per_step:.2f} s/step)"
        for p in quantized
        if p.fits
    )
    return (
        f"{family.name} does not fit in {hw.vram_bytes / GiB:.1f} GiB of VRAM without quantization: the smallest "
        f"unquantized plan (offload={least.offload}) needs {need:.1f} GiB. Give it more memory (--vram {math.ceil(need)})"
        + (f", or allow quantization; these would fit: {alternatives}." if alternatives else "; nothing quantized fits either.")
    )


def plan(family: FamilyConfig | str, vram=None, ram=None, **kwargs) -> Plan:
    """The fastest plan that fits (see `plans`); if none fits, the one with the smallest peak, with `fits=False`."""
    return plans(family, vram, ram, **kwargs)[0]


def _family(family: FamilyConfig | str) -> FamilyConfig:
    if isinstance(family, FamilyConfig):
        return family
    if family not in FAMILIES:
        raise UserError(
            f"{family!r} is not a model family ({', '.join(FAMILIES)}); for a folder, a file or a hub id, plan for "
            "featherflux.loading.resolve_family(...)"
        )
    return FAMILIES[family]
