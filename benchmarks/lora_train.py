"""Training step time and peak memory of `featherflux.lora.train` on CPU (or CUDA), per model size and mode.

    python benchmarks/lora_train.py                       # the whole grid, one fresh process per row
    python benchmarks/lora_train.py --size medium --mode lora --checkpointing   # one row

Random weights and synthetic cached data (latents at the given resolution, 512-token text); the numbers are the
mean wall seconds per optimizer step after 2 warm-up steps, the process CPU seconds per step (all steps; less
sensitive to a shared machine), and the process's peak resident memory (CPU) or peak CUDA
memory, next to the memory held before training started (model + data).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from featherflux.lora.train import CachedDataset, TrainConfig, train
from featherflux.model.config import DiTConfig
from featherflux.model.dit import Flux2

SIZES = {
    # hidden, heads, double, single, context width; in_channels 128 like the real model
    "tiny": DiTConfig(
        context_in_dim=64, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 8, 8, 8)
    ),
    "medium": DiTConfig(
        context_in_dim=1024, hidden_size=768, num_heads=6, depth=2, depth_single_blocks=4, axes_dim=(32, 32, 32, 32)
    ),
}
GRID = [
    ("tiny", "lora", False, None),
    ("tiny", "full", False, None),
    ("medium", "lora", False, None),
    ("medium", "lora", True, None),
    ("medium", "lora", True, "int8"),
    ("medium", "full", False, None),
    ("medium", "full", True, None),
]


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(
    size: str, mode: str, checkpointing: bool, quantize: str | None, resolution: int, steps: int, device: str
) -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    config = SIZES[size]
    model = Flux2(config).to(device).requires_grad_(False)
    if quantize:
        from featherflux.memory.quant import quantize as quantize_model

        quantize_model(model, quantize)
    grid = resolution // 16
    data = CachedDataset(
        [torch.randn(config.in_channels, grid, grid) for _ in range(4)],
        [torch.randn(512, config.context_in_dim) for _ in range(4)],
        torch.zeros(512, config.context_in_dim),
    )
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    before = peak_mib(device)
    times = []
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(mode=mode, steps=steps, rank=16, alpha=16, gradient_checkpointing=checkpointing)
        cpu_start = time.process_time()
        train(model, data, cfg, out)
        cpu = (time.process_time() - cpu_start) / steps
        with open(f"{out}/log.csv") as log:
            times = [float(r.split(",")[3]) for r in log.read().splitlines()[1:]]
    return {
        "size": size,
        "params_M": round(params / 1e6, 1),
        "mode": mode + ("+int8" if quantize else ""),
        "checkpointing": checkpointing,
        "resolution": resolution,
        "s_per_step": round(sum(times[2:]) / max(1, len(times[2:])), 3),
        "cpu_s_per_step": round(cpu, 3),
        "mem_before_train_MiB": round(before),
        "peak_MiB": round(peak_mib(device)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES))
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--quantize", choices=["int8", "nf4"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.size:
        print(
            json.dumps(
                run_one(
                    args.size, args.mode, args.checkpointing, args.quantize, args.resolution, args.steps, args.device
                )
            )
        )
        return
    print(
        f"{'size':7} {'params':>8} {'mode':10} {'ckpt':5} {'res':>4} {'s/step':>7} {'cpu s':>7} {'MiB before':>10} {'peak MiB':>9}"
    )
    for size, mode, ckpt, quant in GRID:
        cmd = [
            sys.executable,
            __file__,
            "--size",
            size,
            "--mode",
            mode,
            "--resolution",
            str(args.resolution),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
        ] + (["--checkpointing"] if ckpt else [])
        cmd += ["--quantize", quant] if quant else []
        row = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
        print(
            f"{row['size']:7} {row['params_M']:>7}M {row['mode']:10} {row['checkpointing']!s:5} {row['resolution']:>4} "
            f"{row['s_per_step']:>7} {row['cpu_s_per_step']:>7} {row['mem_before_train_MiB']:>10} {row['peak_MiB']:>9}"
        )


if __name__ == "__main__":
    main()
