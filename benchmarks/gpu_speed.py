"""Seconds per DiT step of featherflux against diffusers' Flux2Transformer2DModel, same weights, same process, GPU.

    python benchmarks/gpu_speed.py                 # flux.2-dev, klein-4b, klein-9b: bf16, 1024x1024, 512 text tokens
    python benchmarks/gpu_speed.py --small         # a tiny DiT on CPU in fp32: checks the script end to end

Meant to run once on a lent GPU (H100/H200/RTX 4090 sized), in at most `--budget` seconds (default 450): rows that
would not finish in time, do not fit or are not installed are written as skipped, with the reason; nothing makes the
script fail. Every row is printed as soon as it is measured and `gpu_speed.json` / `gpu_speed.md` (in `--out`) are
rewritten after each one, so a run cut short still leaves its table.

Measured, in order:
- the dense matmul ceiling of this device in the run's dtype (TFLOP/s; bf16 8192^3 on CUDA), first;
- per family, random weights made on the device by `build_transformer`, batch 1: featherflux eager with each
  attention backend this device has; compiled (`featherflux.model.compile`, regional, with the fastest backend);
  compiled + FP8 (`quantize="fp8"`: `torch._scaled_mm` on compute capability 8.9+); first-block step caching at
  the default threshold; diffusers eager, with its fastest `set_attention_backend`, and with
  `compile_repeated_blocks` on top. diffusers' model is assembled from views of featherflux's tensors, so the two
  hold one copy of the weights between them.
- per row: s/step (median of `--steps` timed calls after warm-up), the fraction of the ceiling it reaches (FLOPs per
  step from `featherflux.memory.sizes.dit_step_flops`), the time as a multiple of the matmul floor (FLOPs / ceiling),
  peak device memory, and the compile time for compiled rows. The FP8 row also gives its error against bf16 (mean
  |fp8 - bf16| / mean |bf16| of the velocity).
- Step caching: a step that the cache skips runs the first double block and the final layer only. Random weights
  say nothing about how often that happens, so the row gives the time of a skipped step and the mean step time at
  the pass rate measured on the demo (10 of 16 steps run in full at the default threshold; README "Speed").

On the lent GPU (Python 3.12 with torch, transformers and the rest of featherflux's needs; no diffusers, gguf or
bitsandbytes), carry wheels: here, `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation
cp --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata gguf
bitsandbytes` (about 50 MB; `*.whl` is git-ignored), then run there, carrying `.whl`, this and `gpu_memory.py` in
one call of at most 9 minutes:
`python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl &&
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_speed.py --out $OUT --budget 300;
python3 benchmarks/gpu_memory.py --out $OUT --budget 220`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from featherflux.memory.quant import quantize
from featherflux.memory.sizes import dit_step_flops
from featherflux.model import attention
from featherflux.model.build import build_transformer
from featherflux.model.compile import compile_blocks, why_not
from featherflux.model.config import FAMILIES, DiTConfig
from featherflux.model.dit import FirstBlockCache, Flux2
from featherflux.request import DEFAULT_CACHE_THRESHOLD
from featherflux.weights.transformer import config_to_diffusers, native_to_diffusers

FULL_FAMILIES = ("flux.2-dev", "klein-4b", "klein-9b")  # dev first: its row is the headline
DEMO_PASSES, DEMO_STEPS = 10, 16  # first-block cache on the demo at the default threshold (README "Speed")
SMALL = DiTConfig(
    in_channels=16,
    context_in_dim=64,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=(8, 8, 8, 8),
    guidance_embed=True,
)
DIFFUSERS_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_flash_3", "flash", "sage")
GiB = 1 << 30


@dataclass
class Row:
    family: str
    name: str
    seconds: float | None = None  # per step
    ceiling_fraction: float | None = None
    floor_multiple: float | None = None
    peak_gib: float | None = None
    compile_seconds: float | None = None
    note: str = ""


class Report:
    """Rows as they come: printed, and the JSON and markdown (`STEM`.json / .md) rewritten after each one."""

    STEM = "gpu_speed"

    def __init__(self, out: Path, device: str, dtype: torch.dtype, budget: float):
        self.out, self.rows, self.header = out, [], {}
        self.start, self.budget = time.perf_counter(), budget
        self.header = {
            "device": device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
        }
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(self.markdown_line(row), flush=True)
        (self.out / f"{self.STEM}.json").write_text(
            json.dumps({**self.header, "rows": [asdict(r) for r in self.rows]}, indent=1)
        )
        (self.out / f"{self.STEM}.md").write_text(self.markdown())
        return row

    def markdown(self) -> str:
        h = self.header
        lines = [
            (
                f"{h['device']}, {h['dtype']}, torch {h['torch']}; matmul ceiling {h.get('ceiling_tflops', 0):.3g} "
                f"TFLOP/s; {h.get('shape', '')}; compiler: {h.get('compiler', '')}"
            ),
            "",
            "| model | run | s/step | of ceiling | x floor | peak GiB | compile s | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        return "\n".join(lines + [self.markdown_line(r) for r in self.rows]) + "\n"

    @staticmethod
    def markdown_line(r: Row) -> str:
        def fmt(value, spec):
            return "" if value is None else format(value, spec)

        return (
            f"| {r.family} | {r.name} | {fmt(r.seconds, '.4f')} | {fmt(r.ceiling_fraction, '.0%')} | "
            f"{fmt(r.floor_multiple, '.2f')} | {fmt(r.peak_gib, '.1f')} | {fmt(r.compile_seconds, '.0f')} | {r.note} |"
        )


def why(err: Exception) -> str:
    """The first sentence of an error, for a table cell."""
    first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:150]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return "CPU"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.startswith("cuda") else None


def seconds_per_call(fn, device: str, warmup: int, steps: int) -> float:
    """Median of `steps` timed calls, each closed by a device sync (the loop itself never syncs inside a step)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_call_seconds(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_ceiling(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of the best of a few n x n x n matmuls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = seconds_per_call(lambda: a @ b, device, warmup=3, steps=10)
    return 2 * n**3 / best


def step_inputs(config: DiTConfig, side: int, txt_tokens: int, device: str, dtype: torch.dtype):
    """One denoising step's DiT inputs for a side x side latent grid (after 2x2 packing), batch 1."""
    zero = torch.tensor([0])
    x_ids = torch.cartesian_prod(zero, torch.arange(side), torch.arange(side), zero)[None].to(device)
    ctx_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(txt_tokens))[None].to(device)
    x = torch.randn(1, side * side, config.in_channels, device=device, dtype=dtype)
    ctx = torch.randn(1, txt_tokens, config.context_in_dim, device=device, dtype=dtype)
    t = torch.tensor([0.7], device=device)
    guidance = torch.tensor([4.0], device=device) if config.guidance_embed else None
    return x, x_ids, t, ctx, ctx_ids, guidance


def diffusers_twin(model: Flux2):
    """diffusers' Flux2Transformer2DModel holding views of `model`'s tensors (no second copy of the weights)."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        twin = Flux2Transformer2DModel(**config_to_diffusers(model.config))
    twin.load_state_dict(native_to_diffusers(dict(model.state_dict())), assign=True, strict=True)
    return twin.eval().requires_grad_(False)


def bench_family(name: str, config: DiTConfig, report: Report, args) -> None:
    device, dtype = args.device, args.dtype
    side, txt = args.side, args.txt_tokens
    flops = dit_step_flops(config, side * side, txt)
    ceiling = report.header["ceiling_tflops"] * 1e12
    timing = dict(device=device, warmup=2, steps=args.steps)

    def row(run: str, seconds: float | None, **extra) -> Row:
        fraction = None if seconds is None else flops / seconds / ceiling
        multiple = None if seconds is None else seconds / (flops / ceiling)
        return report.add(Row(name, run, seconds, fraction, multiple, peak_gib(device), **extra))

    def skipped(run: str, why: str) -> Row:
        return report.add(Row(name, run, note=f"skipped: {why}"))

    reset_peak(device)
    try:
        model = build_transformer(config, device=device, dtype=dtype)
    except torch.OutOfMemoryError:
        skipped("all", "the bf16 weights do not fit on this device")
        return
    x, x_ids, t, ctx, ctx_ids, guidance = step_inputs(config, side, txt, device, dtype)

    def ours(step_cache=None):
        return model(x, x_ids, t, ctx, ctx_ids, guidance, step_cache)

    with torch.inference_mode():
        reference = ours()  # bf16 eager velocity, for the FP8 error
        backend_times = {}
        for backend in attention.BACKENDS:
            reason = attention.why_not(backend, torch.device(device), dtype)
            if reason is not None:
                skipped(f"eager, {backend}", reason)
                continue
            model.set_attention(attention.select(backend, device, dtype))
            reset_peak(device)
            try:
                backend_times[backend] = seconds_per_call(ours, **timing)
            except Exception as err:  # noqa: BLE001 (an installed backend that refuses this shape: a row, not a crash)
                skipped(f"eager, {backend}", why(err))
                continue
            row(f"eager, {backend}", backend_times[backend])
        best = min(backend_times, key=backend_times.get)
        model.set_attention(attention.select(best, device, dtype))

        cache = FirstBlockCache(DEFAULT_CACHE_THRESHOLD)
        ours(cache)  # a full pass stores the residuals; the same inputs again change nothing, so every call skips
        reset_peak(device)
        skip = seconds_per_call(lambda: ours(cache), **timing)
        mean = (DEMO_PASSES * backend_times[best] + (DEMO_STEPS - DEMO_PASSES) * skip) / DEMO_STEPS
        row(f"first-block cache {DEFAULT_CACHE_THRESHOLD}, {best}", mean,
            note=f"mean at the demo's {DEMO_PASSES}/{DEMO_STEPS} full passes; a skipped step {skip:.4f} s")  # fmt: skip

        diffusers_rows(model, (x, x_ids, t, ctx, ctx_ids, guidance), row, skipped, report, args)

        compile_blocks(model, True, device)
        measured = measure_compiled(f"compiled, {best}", ours, skipped, report, args)
        if measured is None:
            return
        row(f"compiled, {best}", measured[1], compile_seconds=measured[0])
        fp8_run = f"compiled + fp8, {best}"
        if report.left() < args.compile_estimate:
            skipped(fp8_run, "out of time budget")
            return
        quantize(model, "fp8")  # in place: each bf16 weight is freed as its fp8 copy replaces it
        measured = measure_compiled(fp8_run, ours, skipped, report, args)  # the blocks' new layers recompile
        if measured is None:
            return
        error = ((ours() - reference).abs().mean() / reference.abs().mean()).item()
        note = f"error vs bf16 {error:.2%}"
        if not (device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9)):
            note += "; no fp8 tensor cores here: dequantised to bf16 on every call"
        row(fp8_run, measured[1], compile_seconds=measured[0], note=note)


def measure_compiled(run, fn, skipped, report, args) -> tuple[float, float] | None:
    """(compile seconds, s/call) of `fn`, whose model's blocks are compiled: the first call's time is the compile
    time. None, with a skipped row, when the time budget is spent or compiling fails."""
    if report.left() < args.compile_estimate:
        skipped(run, "out of time budget")
        return None
    reset_peak(args.device)
    try:
        compile_seconds = first_call_seconds(fn, args.device)
        return compile_seconds, seconds_per_call(fn, args.device, warmup=1, steps=args.steps)
    except Exception as err:  # noqa: BLE001 (a compiler failure is a row of the table, not the end of the run)
        skipped(run, why(err))
        return None


def diffusers_rows(model, inputs, row, skipped, report, args) -> None:
    try:
        twin = diffusers_twin(model)
    except ImportError:
        skipped("diffusers", "diffusers is not installed")
        return
    x, x_ids, t, ctx, ctx_ids, guidance = inputs
    timing = dict(device=args.device, warmup=2, steps=args.steps)

    def theirs():
        return twin(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids,
                    guidance=guidance, return_dict=False)[0]  # fmt: skip

    times = {}
    for backend in DIFFUSERS_BACKENDS:
        try:
            twin.set_attention_backend(backend)
            reset_peak(args.device)
            times[backend] = seconds_per_call(theirs, **timing)
        except Exception as err:  # not installed, or not for this device / dtype
            if backend == "native":
                raise
            skipped(f"diffusers eager, {backend}", why(err))
            continue
        row(f"diffusers eager, {backend}", times[backend])
    best = min(times, key=times.get)
    twin.set_attention_backend(best)
    twin.compile_repeated_blocks()
    run = f"diffusers compiled, {best}"
    measured = measure_compiled(run, theirs, skipped, report, args)
    if measured is not None:
        row(run, measured[1], compile_seconds=measured[0])
    torch._dynamo.reset()  # drop its compiled graphs, which hold the twin (and views of the weights) alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny DiT on CPU in fp32, in seconds")
    parser.add_argument("--families", nargs="*", help=f"default: {' '.join(FULL_FAMILIES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per row")
    parser.add_argument("--budget", type=float, default=450, help="seconds; later rows are skipped past it")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_speed.json and gpu_speed.md")
    args = parser.parse_args(argv)
    if args.small:
        args.device, args.dtype, args.side, args.txt_tokens = "cpu", torch.float32, 8, 16
        families = {"small": SMALL}
        args.compile_estimate = 0  # a tiny compile: always tried
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --small on CPU")
        args.device, args.dtype, args.side, args.txt_tokens = "cuda", torch.bfloat16, 64, 512
        families = {f: FAMILIES[f].dit for f in (args.families or FULL_FAMILIES)}
        args.compile_estimate = 60  # seconds a regional compile of two block graphs takes, roughly

    report = Report(args.out, args.device, args.dtype, args.budget)
    ceiling = matmul_ceiling(args.device, args.dtype, 8192 if args.device == "cuda" else 512)
    side = args.side * 16
    report.header.update(
        ceiling_tflops=ceiling / 1e12,
        shape=f"{side}x{side} image ({args.side**2} tokens), {args.txt_tokens} text tokens, batch 1",
        compiler=why_not(args.device) or "inductor",
    )
    print(report.markdown(), end="", flush=True)
    for name, config in families.items():
        if report.left() <= 0:
            report.add(Row(name, "all", note="skipped: out of time budget"))
            continue
        bench_family(name, config, report, args)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {args.out / 'gpu_speed.json'} and {args.out / 'gpu_speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
