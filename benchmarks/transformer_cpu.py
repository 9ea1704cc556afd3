"""featherflux's FLUX.2 transformer forward vs diffusers' Flux2Transformer2DModel on CPU, fp32, same process.

Both models hold the same random weights (diffusers' converted to our layout) and get the same inputs. Timed
forwards alternate between the two (median of --rounds). Printed:
- time per forward of featherflux eager, featherflux with its blocks compiled (`featherflux.model.compile`; the
  compile time is printed) and diffusers eager, and the ratios to diffusers (below 1: we are faster), in wall time
  and in the process's CPU time (steadier when other jobs share the cores);
- achieved FLOP/s of each (matmul FLOPs counted with torch.utils.flop_counter, attention FLOPs added
  analytically since the counter does not see CPU attention kernels), next to a
  plain fp32 matmul of the model's typical shape measured in the same run, the practical ceiling, and the matmul
  floor (the forward's FLOPs at that ceiling) with each time as a multiple of it;
- peak memory of each forward: the rise of the process's peak resident set size (VmHWM) over its resident size
  just before the call. VmHWM is reset before each call through /proc/self/clear_refs, and glibc is told to
  return every large free block to the OS at once (fixed mmap threshold, malloc_trim), so the figure is the
  forward's own high-water mark of activations and scratch buffers, weights excluded.

    python benchmarks/transformer_cpu.py [--hidden 1024 --double 2 --single 4 --img 1024 --txt 128 --rounds 7]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
from diffusers import Flux2Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from featherflux.model.compile import compile_blocks
from featherflux.model.dit import Flux2
from featherflux.weights.io import materialize
from featherflux.weights.transformer import config_from_diffusers, diffusers_to_native

LIBC = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta_mb(fn) -> float:
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - before) / 1024


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def wall_and_cpu_seconds(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_flops_per_s(m: int, k: int, n: int, repeats: int = 10) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = min(seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * m * k * n / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--img", type=int, default=1024, help="image tokens (a square grid)")
    parser.add_argument("--txt", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024, help="text-embedding width")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=args.head_dim, num_attention_heads=args.hidden // args.head_dim,
        joint_attention_dim=args.context, axes_dims_rope=(args.head_dim // 4,) * 4, guidance_embeds=False,
    ).eval()  # fmt: skip
    with torch.device("meta"):
        ours = Flux2(config_from_diffusers(dict(reference.config), "benchmark"))
    # our own copy of the weights: cloned so the two models share no storage
    weights = diffusers_to_native({k: v.clone() for k, v in reference.state_dict().items()})
    materialize(ours, weights)
    with torch.device("meta"):
        compiled = Flux2(ours.config)
    materialize(compiled, weights)  # the same tensors as `ours`, its blocks compiled
    compile_blocks(compiled, True, "cpu")

    side = int(args.img**0.5)
    x = torch.randn(1, side * side, 128)
    ctx = torch.randn(1, args.txt, args.context)
    zero = torch.tensor([0])
    x_ids = torch.cartesian_prod(zero, torch.arange(side), torch.arange(side), zero)[None]
    ctx_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(args.txt))[None]
    t = torch.tensor([0.7])

    def run_ours():
        return ours(x, x_ids, t, ctx, ctx_ids)

    def run_compiled():
        return compiled(x, x_ids, t, ctx, ctx_ids)

    def run_diffusers():
        return reference(
            hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids, return_dict=False
        )[0]

    runners = {"featherflux": run_ours, "compiled": run_compiled, "diffusers": run_diffusers}
    with torch.inference_mode():
        diff = (run_ours() - run_diffusers()).abs().max().item()
        compile_seconds = seconds(run_compiled)  # the first call compiles
        compiled_diff = (run_compiled() - run_ours()).abs().max().item()
        # FlopCounterMode counts the matmuls but not CPU attention kernels: add QK^T and AV (2 x 2*S*S*D per layer)
        tokens = side * side + args.txt
        attention_flops = 4 * tokens * tokens * args.hidden * (args.double + args.single)
        flops = {}
        for name, fn in (("featherflux", run_ours), ("diffusers", run_diffusers)):
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops() + attention_flops
        flops["compiled"] = flops["featherflux"]  # the same matmuls; the counter cannot see inside compiled code
        for _ in range(2):  # warm up all
            for fn in runners.values():
                fn()
        times = {name: [] for name in runners}
        cpu_times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                wall, cpu = wall_and_cpu_seconds(fn)
                times[name].append(wall)
                cpu_times[name].append(cpu)
        ceiling = matmul_flops_per_s(side * side + args.txt, args.hidden, 4 * args.hidden)

        LIBC.mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # freed activations go back to the OS: RSS tracks live memory
        peaks = {name: [] for name in runners}
        for _ in range(5):
            for name, fn in runners.items():
                peaks[name].append(peak_rss_delta_mb(fn))

    params = sum(p.numel() for p in ours.parameters())
    print(
        f"config: hidden {args.hidden}, {args.double} double + {args.single} single blocks, {side * side} image + "
        f"{args.txt} text tokens, {params / 1e6:.1f}M parameters, fp32, {torch.get_num_threads()} threads"
    )
    print(f"max |featherflux - diffusers| = {diff:.2e}, max |compiled - eager| = {compiled_diff:.2e}")
    print(f"compile time (first call of the compiled model): {compile_seconds:.1f} s")
    print(f"plain matmul ({side * side + args.txt}x{args.hidden} @ {args.hidden}x{4 * args.hidden}): "
          f"{ceiling / 1e9:.1f} GFLOP/s")  # fmt: skip
    floor = flops["featherflux"] / ceiling
    print(f"matmul floor of one forward ({flops['featherflux'] / 1e9:.1f} GFLOP at that rate): {floor * 1e3:.1f} ms")
    median = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    for name in runners:
        print(
            f"{name:>11}: {median[name] * 1e3:8.1f} ms/forward (min {min(times[name]) * 1e3:.1f}, "
            f"{median[name] / floor:.2f}x the floor), {flops[name] / median[name] / 1e9:6.1f} GFLOP/s, "
            f"peak memory +{statistics.median(peaks[name]):.1f} MiB"
        )
    for name in ("featherflux", "compiled"):
        print(  # on a shared machine CPU time is the steadier measure of the work each forward does
            f"{name} / diffusers: time {median[name] / median['diffusers']:.3f}, "
            f"CPU time {cpu[name] / cpu['diffusers']:.3f}, "
            f"peak memory {statistics.median(peaks[name]) / statistics.median(peaks['diffusers']):.3f}"
        )


if __name__ == "__main__":
    main()
