"""Seconds per DiT step and peak device memory for each memory plan, against diffusers' nearest equivalents.

    python benchmarks/gpu_memory.py                    # real-size flux.2-dev and klein-4b, random weights, 1024², CUDA
    python benchmarks/gpu_memory.py --small            # a scaled-down DiT at 128², 32 text tokens: CPU smoke run

For every (family, VRAM budget) the planner's choice is applied to a random-weight DiT (only the denoising phase is
timed: it is what a 50-step image pays 50 times) with `torch.cuda.set_per_process_memory_fraction` capping the
device at the budget, so a plan that does not really fit fails with OOM instead of borrowing memory.
Compared, in the same process, with a diffusers `Flux2Transformer2DModel` of the same shape:
- resident (the speed every plan is measured against: "x resident");
- `enable_model_cpu_offload` (for one phase this is "resident while denoising, moved in per image": the copy per
  image is printed separately);
- `enable_group_offload(block_level, num_blocks_per_group=1, use_stream=True)`;
- bitsandbytes NF4 (`bnb.nn.Linear4bit` swapped in for every block Linear, which is what diffusers'
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` does at load time).
Group offload and bitsandbytes need CUDA; on CPU (`--small`) only featherflux's plans and the resident diffusers
model run, which checks the script end to end but measures nothing about PCIe.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from featherflux.memory.offload import apply_placement
from featherflux.memory.planner import GiB, plans
from featherflux.model.config import FAMILIES, DiTConfig
from featherflux.model.dit import Flux2

SMALL = DiTConfig(
    in_channels=128,
    context_in_dim=7680,
    hidden_size=128,
    num_heads=1,
    depth=2,
    depth_single_blocks=6,
    axes_dim=(32, 32, 32, 32),
    guidance_embed=False,
)


def fill_random(model: nn.Module, dtype=torch.bfloat16) -> nn.Module:
    """Materialise a meta model on the host with N(0, 0.02) values (one random chunk tiled: fast for 32B params)."""
    model = model.to_empty(device="cpu").to(dtype)
    chunk = (torch.randn(1 << 24) * 0.02).to(dtype)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            flat = t.view(-1)
            for start in range(0, flat.numel(), chunk.numel()):
                n = min(chunk.numel(), flat.numel() - start)
                flat[start : start + n].copy_(chunk[:n])
    return model


def inputs(config: DiTConfig, side: int, device, dtype=torch.bfloat16):
    n, txt = (side // 16) ** 2, (512 if side >= 512 else 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, config.in_channels, generator=g).to(device, dtype)
    ctx = torch.randn(1, txt, config.context_in_dim, generator=g).to(device, dtype)
    x_ids = torch.zeros(1, n, 4, device=device)
    x_ids[0, :, 1] = torch.arange(n, device=device) // (side // 16)
    x_ids[0, :, 2] = torch.arange(n, device=device) % (side // 16)
    ctx_ids = torch.zeros(1, txt, 4, device=device)
    ctx_ids[0, :, 3] = torch.arange(txt, device=device)
    t = torch.full((1,), 0.5, device=device)
    guidance = torch.full((1,), 4.0, device=device) if config.guidance_embed else None
    return x, x_ids, t, ctx, ctx_ids, guidance


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_steps(step, device, steps: int, ledger=None) -> tuple[float, float]:
    """(seconds per step, peak GiB allocated) over `steps` steps after one warm-up step. Without CUDA the peak is
    the placement ledger's logical count of weight bytes on the "device"."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GiB
    else:
        peak = ledger.peak / GiB if ledger is not None else float("nan")
    return (time.perf_counter() - start) / steps, peak


def cap(device, budget_bytes: int | None):
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget_bytes or total) / total), device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(label, fn, rows, baseline=None):
    try:
        sec, peak = fn()
        ratio = f"{sec / baseline:.2f}x" if baseline else "-"
        rows.append((label, f"{sec:.3f}", f"{peak:.4g}", ratio))
        print(f"  {label:58s} {sec:8.3f} s/step  peak {peak:8.4f} GiB  {ratio} resident", flush=True)
        return sec
    except torch.OutOfMemoryError:
        rows.append((label, "OOM", "-", "-"))
        print(f"  {label:58s} OOM", flush=True)
    except Exception as e:  # noqa: BLE001 -- a comparison that cannot run here (no CUDA, missing package) is reported, not fatal
        rows.append((label, f"skipped: {type(e).__name__}: {str(e)[:60]}", "-", "-"))
        print(f"  {label:58s} skipped ({type(e).__name__}: {str(e)[:80]})", flush=True)
    return None


def planned(family, budgets, side):
    """[(VRAM GiB, the planner's choice)] for each budget."""
    return [(vram, plans(family, vram, 128, height=side, width=side)[0]) for vram in budgets]


def forced(family, side):
    """--small: the model fits anywhere, so force each placement (half the blocks resident when streaming)."""
    base = plans(family, 1000, 128, height=side, width=side, offload=None, quantize=None)[0]
    n = base.dit_blocks
    return [
        (1000, base),
        (1000, replace(base, offload="blocks", dit="stream", dit_resident_blocks=tuple(range(0, n, 2)))),
        (1000, replace(base, offload="blocks", dit="stream", dit_resident_blocks=())),
        (1000, replace(base, offload="sequential", dit="sequential")),
        (1000, replace(base, quantize="int8")),
    ]


def featherflux_cases(name, config, candidates, side, device, steps, rows):
    with torch.device("meta"):
        host = Flux2(config)
    host = fill_random(host)
    args = inputs(config, side, device)
    resident = None
    # unquantized plans first: quantizing changes the host model in place
    for vram, p in sorted(candidates, key=lambda c: c[1].quantize is not None):
        model = host  # quantized plans run last and quantize the host model in place (no second host copy)
        pipe = SimpleNamespace(transformer=model, autoencoder=nn.Identity(), prompt_encoder=None)
        cap(device, vram * GiB if device.type == "cuda" else None)
        try:
            placement = apply_placement(pipe, replace(p, text_encoder="offload", autoencoder="offload"), device)
            label = (
                f"featherflux {name} {vram} GiB: offload={p.offload} q={p.quantize or 'bf16'} "
                f"k={len(p.dit_resident_blocks)}/{p.dit_blocks}"
            )
            with placement.phase("dit"):
                case = lambda m=model, ledger=placement.ledger: time_steps(lambda: m(*args), device, steps, ledger)
                sec = run_case(label, case, rows, resident)
            if resident is None and p.offload is None and p.quantize is None:
                resident = sec
            print(f"    planner expected {p.seconds_per_step:.2f} s/step, peak {p.peak_vram_gib:.1f} GiB", flush=True)
            placement.undo(pipe)
        finally:
            cap(device, None)
            free(device)
    del host
    free(device)
    return resident


def diffusers_cases(name, config, side, device, steps, rows, resident):
    from diffusers import Flux2Transformer2DModel

    def new_model():
        with torch.device("meta"):
            m = Flux2Transformer2DModel(
                in_channels=config.in_channels,
                num_layers=config.depth,
                num_single_layers=config.depth_single_blocks,
                attention_head_dim=config.head_dim,
                num_attention_heads=config.num_heads,
                joint_attention_dim=config.context_in_dim,
                axes_dims_rope=config.axes_dim,
                guidance_embeds=config.guidance_embed,
            )
        return fill_random(m)

    x, x_ids, t, ctx, ctx_ids, guidance = inputs(config, side, device)

    def step(m):
        return lambda: m(
            hidden_states=x,
            encoder_hidden_states=ctx,
            timestep=t,
            img_ids=x_ids[0],
            txt_ids=ctx_ids[0],
            guidance=guidance,
            return_dict=False,
        )

    model = new_model()
    moved = {}

    def resident_case():
        start = time.perf_counter()
        model.to(device)
        sync(device)
        moved["s"] = time.perf_counter() - start
        try:
            return time_steps(step(model), device, steps)
        finally:
            model.to("cpu")
            free(device)

    base = run_case(f"diffusers {name}: resident", resident_case, rows)
    resident = resident or base
    if "s" in moved:  # model CPU offload denoises with the DiT resident; it pays the move once per image
        print(
            f"  diffusers {name}: enable_model_cpu_offload = resident while denoising "
            f"+ {moved['s']:.1f} s per image to move the DiT in",
            flush=True,
        )
        rows.append(
            (
                f"diffusers {name}: enable_model_cpu_offload (+{moved['s']:.1f} s/image move)",
                rows[-1][1],
                rows[-1][2],
                "1.00x",
            )
        )

    def bnb_nf4():
        import bitsandbytes as bnb

        if device.type != "cuda":
            raise RuntimeError("bitsandbytes 4-bit matmul needs CUDA here")
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        for parent in [m for block in blocks for m in block.modules()]:
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                    )
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    setattr(parent, child_name, q)
        model.to(device)  # quantizes on the way in
        return time_steps(step(model), device, steps)

    run_case(f"diffusers {name}: bitsandbytes nf4 resident", bnb_nf4, rows, resident)
    model = None  # release the host copy before group offload builds its own
    free(device)

    def group_offload():
        if device.type != "cuda":
            raise RuntimeError("group offload with streams needs CUDA")
        fresh = new_model()
        fresh.enable_group_offload(
            onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=True
        )
        return time_steps(step(fresh), device, steps)

    run_case(f"diffusers {name}: enable_group_offload(block, use_stream)", group_offload, rows, resident)
    free(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a scaled-down DiT at 128x128 (CPU-friendly)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["flux.2-dev", "klein-4b"])
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    if args.small:
        small_family = replace(FAMILIES["klein-4b"], dit=SMALL, name="small")
        cases = [("small", SMALL, forced(small_family, 128), 128)]
    else:
        budgets = {"flux.2-dev": [139, 24, 16, 8], "klein-4b": [139, 24, 8]}
        cases = [(f, FAMILIES[f].dit, planned(FAMILIES[f], budgets.get(f, [24, 8]), 1024), 1024) for f in args.families]
    print(f"device {device}; {args.steps} timed steps after 1 warm-up; image tokens at the given side, 512 text tokens")
    for name, config, candidates, side in cases:
        print(f"{name} at {side}x{side}:")
        resident = featherflux_cases(name, config, candidates, side, device, args.steps, rows)
        diffusers_cases(name, config, side, device, args.steps, rows, resident)
    print("\n| case | s/step | peak GiB | vs resident |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
