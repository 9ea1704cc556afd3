"""Each memory plan on a real GPU: seconds per DiT step, peak VRAM and pinned host memory against the plan, and how
much of the host-to-device copying hid behind compute; diffusers' offloading beside it.

    python benchmarks/gpu_memory.py                  # klein-4b, then flux.2-dev: random bf16 weights, 1024x1024
    python benchmarks/gpu_memory.py --small          # a tiny DiT on CPU: checks the script end to end

Meant to run once on a lent GPU, in at most `--budget` seconds (default 230), right after `gpu_speed.py`. Every row
is printed as it finishes and `gpu_memory.json` / `gpu_memory.md` (in `--out`) are rewritten after each one, so a
run cut short still leaves its table. Rows that do not fit, would not finish in time, or need a package that is not
installed (diffusers, bitsandbytes) are written as skipped with the reason; nothing makes the script fail.

Per family (klein-4b first: it is quick), for each VRAM budget and each of bf16 (`quantize="none"`), fp8, int8 and
nf4 (dev: bf16 and fp8 only; quantizing 32B weights three times would not fit the time), the planner's choice is
applied to a random-weight DiT and only the denoising phase is timed, with `torch.cuda.set_per_process_memory_fraction`
capping the device at the budget so that a plan that does not really fit fails with OOM instead of borrowing
memory. Columns:
- s/step, and x resident: against the same weights fully resident on the uncapped device;
- peak VRAM measured (`max_memory_allocated`) against the plan's prediction for the DiT phase
  (`Plan.dit_peak_bytes`; the reserve for the CUDA context is not in either);
- pinned host bytes the streamers hold (exact packed blocks, or the staging buffers) against `Plan.pinned_bytes`,
  and torch's own pinned allocator peak, which should stay near 0;
- overlap: the share of the copy time hidden behind compute, (resident + copy - streamed) / copy, where copy is the
  streamed bytes at the measured host-to-device rate;
- left: device bytes still allocated after the phase closed (should be 0: nothing streamed outlives its phase).
diffusers rows (same shape, its own random weights): resident, and `enable_group_offload(block_level,
use_stream=True)` at 24 GiB, the comparison for streamed plans.

Weights are filled on the host directly in bf16 (a meta model cast to bf16, then one random chunk tiled), never in
fp32 first. They are not written to a file to be memory-mapped: flux.2-dev's 60 GiB would not fit next to the
system on the lent machine's 64 GiB disk. Quantized rows quantize the host model block by block on the GPU.

Run it on a lent GPU as `gpu_speed.py`'s docstring says, with `benchmarks/gpu_memory.py --out $OUT` in place of it
(or both, one after the other, in one call).
"""

from __future__ import annotations

import argparse
import copy
import gc
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from gpu_speed import Report, device_name, seconds_per_call, step_inputs, sync, why
from torch import nn

from featherflux.memory.offload import apply_placement
from featherflux.memory.planner import GiB, Plan, plans
from featherflux.memory.quant import quantize
from featherflux.memory.sizes import dit_weights
from featherflux.model.config import FAMILIES, DiTConfig
from featherflux.model.dit import Flux2

SMALL = DiTConfig(  # klein-4b's input widths (the family checks them), a tiny trunk
    in_channels=128,
    context_in_dim=7680,
    hidden_size=128,
    num_heads=1,
    depth=2,
    depth_single_blocks=4,
    axes_dim=(32, 32, 32, 32),
    guidance_embed=False,
)
CASES = {  # family -> (VRAM budgets in GiB, quantizations); "device" is the whole card
    "klein-4b": (("device", 24, 8), (None, "fp8", "int8", "nf4")),
    "flux.2-dev": (("device", 24), (None, "fp8")),
}


@dataclass
class Row:
    family: str
    name: str
    seconds: float | None = None
    x_resident: float | None = None
    peak_gib: float | None = None
    planned_peak_gib: float | None = None
    pinned_gib: float | None = None
    planned_pinned_gib: float | None = None
    torch_pinned_gib: float | None = None
    overlap: float | None = None
    left_gib: float | None = None
    note: str = ""


class MemoryReport(Report):
    STEM = "gpu_memory"

    def markdown(self) -> str:
        h = self.header
        lines = [
            f"{h['device']}, torch {h['torch']}; {h.get('shape', '')}; host-to-device {h.get('h2d_gbps', 0):.1f} GB/s",
            "",
            (
                "| model | plan | s/step | x resident | peak GiB (plan) | pinned GiB (plan) | torch pinned GiB "
                "| overlap | left GiB | note |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        return "\n".join(lines + [self.markdown_line(r) for r in self.rows]) + "\n"

    @staticmethod
    def markdown_line(r: Row) -> str:
        def fmt(value, spec):
            return "" if value is None else format(value, spec)

        return (
            f"| {r.family} | {r.name} | {fmt(r.seconds, '.3f')} | {fmt(r.x_resident, '.2f')} | "
            f"{fmt(r.peak_gib, '.2f')} ({fmt(r.planned_peak_gib, '.2f')}) | "
            f"{fmt(r.pinned_gib, '.2f')} ({fmt(r.planned_pinned_gib, '.2f')}) | {fmt(r.torch_pinned_gib, '.2f')} | "
            f"{fmt(r.overlap, '.0%')} | {fmt(r.left_gib, '.3f')} | {r.note} |"
        )


def random_bf16(meta_model: nn.Module) -> nn.Module:
    """A meta model on the host in bf16 with N(0, 0.02)-like values: cast on meta, allocated once in bf16, filled by
    tiling one random chunk (drawing 32B normal values would take minutes)."""
    model = meta_model.to(torch.bfloat16).to_empty(device="cpu").eval().requires_grad_(False)
    chunk = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            flat = t.view(-1)
            for start in range(0, flat.numel(), chunk.numel()):
                n = min(chunk.numel(), flat.numel() - start)
                flat[start : start + n].copy_(chunk[:n])
    return model


def quantize_on(model: Flux2, mode: str, device: str) -> Flux2:
    """Quantize the host model in place, one block at a time on `device` (fast), leaving it on the host."""
    for blocks in (model.double_blocks, model.single_blocks):
        for block in blocks:
            quantize(block.to(device), mode).to("cpu")
    return quantize(model, mode)  # what is outside the blocks, on the host (small)


def torch_pinned_bytes() -> int | None:
    """Peak bytes of torch's own pinned host allocator (the streamers pin with cudaHostRegister instead)."""
    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak", 0))


def h2d_gbps(device: str) -> float:
    """Pinned host-to-device copy rate, pinned as the streamers pin (cudaHostRegister), so that torch's own pinned
    allocator stays untouched and its statistics show only what the plans make it pin."""
    if not device.startswith("cuda"):
        return 0.0
    host = torch.empty(1 << 30, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)
    target = torch.empty_like(host, device=device)
    seconds = seconds_per_call(lambda: target.copy_(host, non_blocking=True), device, warmup=1, steps=3)
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    return host.numel() / seconds / 1e9


def cap(device: str, budget: int | None) -> None:
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget or total) / total), device)


def clean(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def plan_rows(family, model: Flux2, quant: str | None, budgets, inputs, report: MemoryReport, args) -> None:
    device, vram = args.device, device_vram(args.device)
    resident_seconds = None
    for budget in budgets:
        gib = vram if budget == "device" else budget
        label = f"{'device' if budget == 'device' else f'{budget} GiB'}: {quant or 'bf16'}"
        if report.left() < 20:
            report.add(Row(family.name, label, note="skipped: out of time"))
            continue
        try:
            p = forced_plan(family, quant) if args.small else plans(family, gib, 256, quantize=quant or "none")[0]
        except ValueError as e:  # quantize="none" that cannot fit says so
            report.add(Row(family.name, label, note=f"skipped: {why(e)}"))
            continue
        label += f", offload={p.offload} ({p.dit}, {len(p.dit_resident_blocks)}/{p.dit_blocks} blocks resident)"
        row = run_plan(family, model, p, gib, inputs, args)
        row.name = label
        if budget == "device" and row.seconds:
            resident_seconds = row.seconds
        if resident_seconds and row.seconds:
            row.x_resident = row.seconds / resident_seconds
            copy_seconds = copied_bytes(family, p) / (report.header["h2d_gbps"] * 1e9) if device != "cpu" else 0
            if copy_seconds:
                row.overlap = max(0.0, min(1.0, (resident_seconds + copy_seconds - row.seconds) / copy_seconds))
        report.add(row)


def device_vram(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory / GiB
    return 1000.0


def forced_plan(family, quant: str | None) -> Plan:
    """--small: the tiny model fits anywhere, so stream half its blocks to exercise the streaming path."""
    base = plans(family, 1000, 256, offload=None, quantize=quant or "none")[0]
    return replace(base, offload="blocks", dit="stream", dit_resident_blocks=tuple(range(0, base.dit_blocks, 2)))


def copied_bytes(family, p: Plan) -> int:
    """Bytes a streamed plan copies to the device per step."""
    blocks = dit_weights(family.dit).block_bytes(p.quantize)
    if p.dit == "stream":
        return sum(b for i, b in enumerate(blocks) if i not in p.dit_resident_blocks)
    return sum(blocks) if p.dit == "sequential" else 0


def run_plan(family, model: Flux2, p: Plan, budget_gib: float, inputs, args) -> Row:
    device = args.device
    row = Row(family.name, "")
    if not args.small:  # --small forces its placements, so the plan's figures are not for them
        row.planned_peak_gib, row.planned_pinned_gib = p.dit_peak_bytes / GiB, p.pinned_bytes / GiB
    if not p.fits:
        row.note = "skipped: the planner says it does not fit"
        return row
    pipe = SimpleNamespace(transformer=model, autoencoder=nn.Identity(), prompt_encoder=None)
    placement = None
    clean(device)
    cap(device, int(budget_gib * GiB))
    try:
        placement = apply_placement(pipe, replace(p, text_encoder="offload", autoencoder="offload"), device)
        row.pinned_gib = sum(s.host_bytes for s in placement.streamers.values()) / GiB
        before = torch.cuda.memory_allocated(device) if device.startswith("cuda") else placement.ledger.current
        with torch.inference_mode(), placement.phase("dit"):
            row.seconds = seconds_per_call(lambda: model(*inputs), device, warmup=1, steps=args.steps)
        sync(device)
        if device.startswith("cuda"):
            row.peak_gib = torch.cuda.max_memory_allocated(device) / GiB
            row.left_gib = (torch.cuda.memory_allocated(device) - before) / GiB
            pinned = torch_pinned_bytes()
            row.torch_pinned_gib = None if pinned is None else pinned / GiB
        else:
            row.peak_gib = placement.ledger.peak / GiB  # weights only: the CPU has no allocator statistics
            row.left_gib = (placement.ledger.current - before) / GiB
    except Exception as e:  # noqa: BLE001 -- an OOM or a missing package is a row of the table, not the end of the run
        row.note = f"skipped: {why(e)}"
    finally:
        if placement is not None:
            placement.undo(pipe)
        cap(device, None)
        clean(device)
    return row


def diffusers_rows(family, config: DiTConfig, inputs, report: MemoryReport, args) -> None:
    device = args.device
    try:
        from diffusers import Flux2Transformer2DModel

        from featherflux.weights.transformer import config_to_diffusers
    except ImportError as e:
        report.add(Row(family.name, "diffusers", note=f"skipped: not installed ({why(e)})"))
        return
    x, x_ids, t, ctx, ctx_ids, guidance = inputs
    with torch.device("meta"):
        meta = Flux2Transformer2DModel(**config_to_diffusers(config))
    twin = random_bf16(meta)

    def step(model):
        return lambda: model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            timestep=t,
            img_ids=x_ids[0],
            txt_ids=ctx_ids[0],
            guidance=guidance,
            return_dict=False,
        )

    resident = Row(family.name, "diffusers: resident")
    try:
        clean(device)
        with torch.inference_mode():
            resident.seconds = seconds_per_call(step(twin.to(device)), device, warmup=1, steps=args.steps)
        resident.peak_gib = torch.cuda.max_memory_allocated(device) / GiB if device.startswith("cuda") else None
    except Exception as e:  # noqa: BLE001 -- reported in the table
        resident.note = f"skipped: {why(e)}"
    twin.to("cpu")
    report.add(resident)
    grouped = Row(family.name, "diffusers: enable_group_offload(block_level, use_stream=True) at 24 GiB")
    if not device.startswith("cuda"):
        grouped.note = "skipped: group offload with streams needs CUDA"
    elif report.left() < 30:
        grouped.note = "skipped: out of time"
    else:
        try:
            clean(device)
            cap(device, 24 * GiB)
            twin.enable_group_offload(
                onload_device=torch.device(device), offload_type="block_level", num_blocks_per_group=1, use_stream=True
            )
            with torch.inference_mode():
                grouped.seconds = seconds_per_call(step(twin), device, warmup=1, steps=args.steps)
            grouped.peak_gib = torch.cuda.max_memory_allocated(device) / GiB
            if resident.seconds:
                grouped.x_resident = grouped.seconds / resident.seconds
        except Exception as e:  # noqa: BLE001 -- reported in the table
            grouped.note = f"skipped: {why(e)}"
        finally:
            cap(device, None)
    report.add(grouped)
    del twin
    clean(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny DiT on CPU: checks the script end to end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up step")
    parser.add_argument("--budget", type=float, default=230, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_memory.json and gpu_memory.md")
    args = parser.parse_args(argv)
    if args.small:
        args.device = "cpu"
        cases = {"small": (("device",), (None, "int8"))}
    else:
        cases = CASES
    report = MemoryReport(args.out, args.device, torch.bfloat16, args.budget)
    side = 8 if args.small else 64  # latent grid after packing: 1024x1024 pixels
    txt = 16 if args.small else 512
    report.header |= {
        "device": device_name(args.device),
        "shape": f"{side * 16}x{side * 16}, {txt} text tokens, batch 1",
        "h2d_gbps": h2d_gbps(args.device),
    }
    for name, (budgets, quants) in cases.items():
        family = replace(FAMILIES["klein-4b"], dit=SMALL, name="small") if args.small else FAMILIES[name]
        with torch.device("meta"):
            meta = Flux2(family.dit)
        host = random_bf16(meta)
        inputs = step_inputs(family.dit, side, txt, args.device, torch.bfloat16)
        for i, quant in enumerate(quants):
            if quant is None:
                plan_rows(family, host, None, budgets, inputs, report, args)
                continue
            last = i + 1 == len(quants)  # the last quantization may overwrite the bf16 weights: no second copy
            quantized = quantize_on(host if last else copy.deepcopy(host), quant, args.device)
            plan_rows(family, quantized, quant, budgets, inputs, report, args)
            del quantized
            gc.collect()
        del host
        clean(args.device)
        diffusers_rows(family, family.dit, inputs, report, args)
    print(f"wrote {args.out / 'gpu_memory.json'} and {args.out / 'gpu_memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
