"""Seconds per DiT step and peak memory per rank of `featherflux.parallel` at 1, 2, 4 and 8 ranks, for every parallel
mode, at 1024x1024 and 2048x2048 (random weights), against diffusers' context (and tensor) parallelism on the same
ranks when diffusers is installed.

    # GPUs, one torchrun launch per rank count (1 first: the speed-ups are against it), into one folder:
    for n in 1 2 4 8; do torchrun --nproc-per-node $n benchmarks/multi_gpu.py --out results/; done
    # or one command that starts the rank counts itself (torch.multiprocessing, NCCL; counts above the visible GPUs
    # are skipped with a row that says so):
    python benchmarks/multi_gpu.py --out results/
    # CPU processes on gloo, the tiny "demo" DiT at 64x64 and 128x128: checks the script end to end in seconds
    OMP_NUM_THREADS=1 python benchmarks/multi_gpu.py --cpu --ranks 1 2 --out /tmp/multi

Rows are printed by rank 0 as they finish and `multi_gpu.json` / `multi_gpu.md` (in `--out`) are rewritten after
each one, so a run cut short still leaves its table. A torchrun launch replaces the rows of its own rank count and
keeps the others (of the same device, dtype and text length): use an empty folder for a new series. The
single-command form starts from an empty table.

Per rank count, family (flux.2-dev, klein-9b, klein-4b; `--families`) and parallel mode (every one of
`featherflux.parallel.PARALLEL_MODES`; `--modes`):
- 1 rank: the plain DiT ("single"), batch 1, and batch 2 (one true-CFG step) when a cfg mode is asked for; these
  rows are the baselines of the speed-up column (featherflux rows against featherflux's, diffusers' against
  diffusers').
- more ranks: each mode whose layout is valid for the rank count (`featherflux.parallel.group.mesh_degrees`); the
  others are written as skipped with featherflux's own reason (Ulysses degree not dividing the heads, an odd count
  for cfg, ...), and so is a mode whose layout repeats an earlier one (cfg+ulysses on 2 ranks is cfg). "usp" takes a
  Ulysses degree of half the ranks of a pass (a real 2-D mesh; it needs 4 of them), tensor+ulysses / tensor+ring a
  tensor degree of 2. cfg modes run batch 2 (conditional and unconditional rows of true CFG), the others batch 1.
- the DiT is made in bf16 (fp32 with `--cpu`) on the rank's device by `featherflux.model.build_transformer` (random
  weights) and wrapped as `featherflux.parallel.parallelize` does (`ParallelDiT` over a mesh from `init_mesh`; the
  meshes are made once per layout and reused, so NCCL communicators are not created per row). With tensor
  parallelism the DiT is made on the meta device, sliced, and only this rank's slices are filled with random values
  on the device, as a rank that memory-maps a checkpoint holds only its slices. The attention backend is "auto".
- columns: s/step (median of `--steps` steps after `--warmup`, each timed between a device sync and a barrier; the
  slowest rank's), speed-up against the 1-rank row of the same implementation, family, size and batch, TFLOP/s per
  rank (`featherflux.memory.sizes.dit_step_flops` / s/step / ranks), peak memory per rank
  (`torch.cuda.max_memory_allocated`, the largest rank's; "n/a" on CPU), and a note.
- diffusers (GPU only, when installed): its `Flux2Transformer2DModel` with its own random weights and
  `set_attention_backend(--diffusers-backend)` (default `_native_cudnn`: its ring needs a backend that returns the
  log-sum-exp, which `native` does not), plain on 1 rank, and with `enable_parallelism` for ulysses
  (`ContextParallelConfig(ulysses_degree=n)`), ring (`ring_degree=n`), usp (both, the same degrees as featherflux's)
  and tensor (`TensorParallelConfig`), on the same device meshes every time. diffusers 0.42.1 puts each rank on an
  accelerator (`rank % torch.accelerator.device_count()`), so it has no gloo/CPU path: `--cpu` writes one skipped
  row per rank count saying so.

Nothing makes the script fail: a row whose weights and activations would not fit the device (estimated from
`featherflux.memory.sizes` before building), that runs out of memory, raises, or would start after `--budget`
seconds (per rank count) is written as skipped with the reason; a rank count whose processes die is written as one
skipped row (single-command form). Every rank agrees on each skip before the next collective, so one rank's error
does not leave the others waiting; an error inside a collective on one rank only still ends that rank count at the
process-group timeout (`--timeout`).

The GPU path is written but has not been measured yet: no GPU was available when it was written; only `--cpu` has
run (tests/benchmarks/test_multi_gpu.py runs it on 1 and 2 gloo ranks).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gpu_speed import Report as SpeedReport
from gpu_speed import device_name, why

from featherflux.errors import UserError
from featherflux.memory.sizes import dit_activation_bytes, dit_step_flops, dit_weights
from featherflux.model import attention
from featherflux.model.build import build_transformer, default_dtype
from featherflux.model.config import FAMILIES, DiTConfig
from featherflux.parallel import PARALLEL_MODES, ParallelDiT
from featherflux.parallel.group import init_mesh, mesh_degrees

STEM = "multi_gpu"
GPU_FAMILIES = ("flux.2-dev", "klein-9b", "klein-4b")
GPU_SIZES = (1024, 2048)
CPU_FAMILIES = ("demo",)
CPU_SIZES = (64, 128)
RANKS = (1, 2, 4, 8)
DIFFUSERS_MODES = ("ulysses", "ring", "usp", "tensor")
SAME_SERIES = ("device", "dtype", "txt_tokens")  # header keys that must match to keep an earlier launch's rows
MEMORY_HEADROOM = 0.92  # of the device's memory: what the estimate may use
GiB = 1 << 30


@dataclass
class Row:
    ranks: int
    family: str
    size: int | None  # pixels per side; None: every size
    impl: str  # "featherflux" or "diffusers"
    mode: str  # "single" (one process), a parallel mode, or "all"
    layout: str = ""  # degrees: cfg halves, tensor, ulysses, ring
    batch: int = 1
    seconds: float | None = None  # per step, the slowest rank's
    speedup: float | None = None  # against the 1-rank row of the same impl, family, size and batch
    tflops_per_rank: float | None = None
    peak_gib: float | None = None  # the largest rank's
    note: str = ""


class Report(SpeedReport):
    """Rank 0's rows (with the earlier launches' of other rank counts): printed, and the JSON and markdown rewritten
    after each one. `world=None` keeps every earlier row (the single-command form's parent adding a row)."""

    STEM = STEM

    def __init__(self, out: Path, header: dict, world: int | None, budget: float = float("inf")):
        self.out, self.header, self.rows = out, header, []
        self.start, self.budget = time.perf_counter(), budget
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{STEM}.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if all(old.get(k) == header[k] for k in SAME_SERIES):
                    self.rows = [Row(**r) for r in old["rows"] if world is None or r["ranks"] != world]
            except (ValueError, KeyError, TypeError):  # unreadable, or an older format: start a new table
                self.rows = []

    def add(self, row: Row) -> Row:
        if row.seconds is not None:
            base = self.baseline(row)
            row.speedup = None if base is None else base / row.seconds
        return super().add(row)

    def baseline(self, row: Row) -> float | None:
        for r in self.rows:
            same = (r.impl, r.family, r.size, r.batch) == (row.impl, row.family, row.size, row.batch)
            if same and r.ranks == 1 and r.mode == "single" and r.seconds:
                return r.seconds
        return row.seconds if row.ranks == 1 and row.mode == "single" else None

    def markdown(self) -> str:
        h = self.header
        lines = [
            (
                f"{h['device']}, {h['dtype']}, torch {h['torch']}, featherflux attention {h['attention']}, diffusers "
                f"{h['diffusers'] or 'not installed'} ({h['diffusers_backend']}); "
                f"{h['txt_tokens']} text tokens; s/step: median of {h['steps']} steps after {h['warmup']} warm-up, "
                f"the slowest rank's; peak: the largest rank's; speed-up: against the same implementation on 1 rank"
            ),
            "",
            "| ranks | model | size | impl | mode | layout | batch | s/step | speed-up | TFLOP/s/rank | peak GiB/rank | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        return "\n".join(lines + [self.markdown_line(r) for r in self.rows]) + "\n"

    def markdown_line(self, r: Row) -> str:
        def fmt(value, spec):
            return "" if value is None else format(value, spec)

        size = "all" if r.size is None else f"{r.size}x{r.size}"
        peak = fmt(r.peak_gib, ".1f") if self.header["peak"] else "n/a"
        return (
            f"| {r.ranks} | {r.family} | {size} | {r.impl} | {r.mode} | {r.layout} | {r.batch} | "
            f"{fmt(r.seconds, '.4f')} | {fmt(r.speedup, '.2f')} | {fmt(r.tflops_per_rank, '.3g')} | "
            f"{peak if r.seconds is not None else ''} | {r.note} |"
        )


# --- what every rank runs --------------------------------------------------------------------------------------


def decide(fn):
    """Rank 0's answer (a small picklable value) on every rank."""
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def together(fn, share: bool = False):
    """(value, None) where `fn` worked on every rank, else (None, the first rank's error). With `share`, value is
    the list of every rank's values (small and picklable); otherwise this rank's own."""
    try:
        value, error = fn(), None
    except Exception as err:  # noqa: BLE001 (a row that fails is a row of the table, not the end of the run)
        value, error = None, why(err)
        if isinstance(err, torch.OutOfMemoryError):
            error = "out of memory"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (error, value if share else None))
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        return None, errors[0]
    return ([v for _, v in gathered] if share else value), None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device) -> None:
    dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seconds_per_step(call, device: torch.device, warmup: int, steps: int) -> float:
    """Median of `steps` calls, each started on every rank together and closed by a device sync."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        sync(device)
        barrier(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_inputs(config: DiTConfig, side: int, txt: int, batch: int, device: torch.device, dtype: torch.dtype):
    """One step's whole inputs, the same on every rank (made from one seed on the host)."""
    zero = torch.tensor([0])
    x_ids = torch.cartesian_prod(zero, torch.arange(side), torch.arange(side), zero)[None].to(device)
    ctx_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(txt))[None].to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, side * side, config.in_channels, generator=generator).to(device, dtype)
    ctx = torch.randn(batch, txt, config.context_in_dim, generator=generator).to(device, dtype)
    t = torch.full((batch,), 0.7, device=device)
    guidance = torch.full((batch,), 4.0, device=device) if config.guidance_embed else None
    return x, x_ids, t, ctx, ctx_ids, guidance


def layout_name(layout: tuple[int, int, int, int]) -> str:
    cfg, tensor, ulysses, ring = layout
    return f"cfg{cfg} tp{tensor} u{ulysses} r{ring}"


def mode_degree(mode: str, world: int) -> int | None:
    """The `degree` this benchmark gives `mode` (see the module docstring), or a UserError."""
    if "usp" not in mode.split("+"):
        return None
    per_pass = world // 2 if mode.startswith("cfg+") else world
    if per_pass < 4:
        raise UserError(f"usp on {per_pass} rank(s) per pass is plain ulysses or ring; a 2-D mesh needs 4")
    return per_pass // 2


def estimate_bytes(config: DiTConfig, layout, tokens: int, txt: int, batch: int, elem: int) -> int:
    """A rank's weights (its slices with tensor parallelism) and twice the activation estimate of its share."""
    cfg, tensor, ulysses, ring = layout
    w = dit_weights(config)
    blocks = w.total.nbytes() - w.globals.nbytes()
    weights = (w.globals.nbytes() + blocks // tensor) * elem // 2
    context = ulysses * ring
    local_batch = batch // cfg if batch % cfg == 0 else batch
    activations = dit_activation_bytes(config, -(-tokens // context), -(-txt // context), local_batch, elem)
    return weights + 2 * activations


@torch.no_grad()
def fill_random(module: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Uniform +-1/sqrt(fan_in) matrices (PyTorch's Linear default range) and ones for vectors, on the device."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for p in module.parameters():
        if p.ndim >= 2:
            bound = p.shape[1] ** -0.5
            p.uniform_(-bound, bound, generator=generator)
        else:
            p.fill_(1.0)


class Bench:
    """One rank's part of a rank count's rows."""

    def __init__(self, args, header: dict):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(args.device_type, torch.cuda.current_device()) if args.cuda else torch.device("cpu")
        self.dtype = torch.float32 if args.cpu else torch.bfloat16
        self.report = Report(args.out, header, self.world, args.budget) if self.rank == 0 else None
        self.meshes, self.device_meshes = {}, {}
        self.diffusers_reason = self._diffusers_reason()

    def emit(self, row: Row) -> None:
        if self.report is not None:
            self.report.add(row)

    def _diffusers_reason(self) -> str | None:
        if self.args.no_diffusers:
            return "--no-diffusers"
        if importlib.util.find_spec("diffusers") is None:
            return "diffusers is not installed"
        if not self.args.cuda:
            return (
                "diffusers' parallelism puts each rank on an accelerator (rank % torch.accelerator.device_count()); "
                "it has no CPU/gloo path"
            )
        return None

    def run(self) -> None:
        if self.diffusers_reason is not None:
            self.emit(Row(self.world, "all", None, "diffusers", "all", note=f"skipped: {self.diffusers_reason}"))
        for family in self.args.families:
            config = FAMILIES[family].dit
            per_token = FAMILIES[family].autoencoder.downsample_factor * FAMILIES[family].autoencoder.patch_size
            sides = {size: size // per_token for size in self.args.sizes}
            if self.world == 1:
                batches = (1, 2) if any(m.startswith("cfg") for m in self.args.modes) else (1,)
                layout = (1, 1, 1, 1)
                self.group("featherflux", family, config, "single", layout, sides, batches)
                if self.diffusers_reason is None:
                    self.group("diffusers", family, config, "single", layout, sides, (1,))
                continue
            seen = {}
            for mode in self.args.modes:
                batch = 2 if mode.startswith("cfg") else 1  # cfg: one true-CFG step, both passes
                try:
                    degree = mode_degree(mode, self.world)
                    layout = mesh_degrees(mode, self.world, degree, config.num_heads, config.mlp_hidden_dim)
                except UserError as err:
                    self.emit(Row(self.world, family, None, "featherflux", mode, batch=batch, note=f"skipped: {err}"))
                    continue
                if layout in seen:
                    note = f"skipped: the same layout as {seen[layout]}"
                    self.emit(Row(self.world, family, None, "featherflux", mode, layout_name(layout), batch, note=note))
                    continue
                seen[layout] = mode
                self.group("featherflux", family, config, mode, layout, sides, (batch,), degree)
                if self.diffusers_reason is None and mode in DIFFUSERS_MODES:
                    self.group("diffusers", family, config, mode, layout, sides, (1,))

    def group(self, impl, family, config, mode, layout, sides, batches, degree=None) -> None:
        """The rows of one model: built once, measured at every size and batch that fits."""
        shapes = [(size, batch) for size in sides for batch in batches]

        def row(size, batch, **values) -> Row:
            return Row(self.world, family, size, impl, mode, layout_name(layout), batch, **values)

        over = decide(lambda: self.report.left() <= 0)
        if over:
            for size, batch in shapes:
                self.emit(row(size, batch, note="skipped: out of time budget"))
            return
        fitting = []
        built = layout if impl == "featherflux" else (*layout[:1], 1, *layout[2:])  # diffusers shards after building
        for size, batch in shapes:
            reason = decide(lambda s=size, b=batch: self.too_big(config, built, sides[s] ** 2, b))
            if reason:
                self.emit(row(size, batch, note=f"skipped: {reason}"))
            else:
                fitting.append((size, batch))
        if not fitting:
            return
        release(self.device)
        build = self.build_diffusers if impl == "diffusers" else self.build_featherflux
        model, error = together(lambda: build(config, mode, layout, degree))
        if error is not None:
            for size, batch in fitting:
                self.emit(row(size, batch, note=f"skipped: building it: {error}"))
            release(self.device)
            return
        call = self.call_diffusers if impl == "diffusers" else self.call_featherflux
        for size, batch in fitting:
            if decide(lambda: self.report.left() <= 0):
                self.emit(row(size, batch, note="skipped: out of time budget"))
                continue
            side = sides[size]
            measured, error = together(lambda m=model, s=side, b=batch: self.measure(m, call, config, s, b), share=True)
            if error is not None:
                self.emit(row(size, batch, note=f"skipped: {error}"))
                release(self.device)
                continue
            seconds = max(s for s, _ in measured)
            peaks = [p for _, p in measured if p is not None]
            flops = dit_step_flops(config, side * side, self.args.txt_tokens, batch)
            self.emit(
                row(size, batch, seconds=seconds, tflops_per_rank=flops / seconds / self.world / 1e12,
                    peak_gib=max(peaks) if peaks else None, note=self.compare(impl, family, mode, size, seconds))
            )  # fmt: skip
        model = None
        release(self.device)

    def compare(self, impl: str, family: str, mode: str, size: int, seconds: float) -> str:
        """For a diffusers row: how featherflux's time for the same mode and shape compares."""
        if impl != "diffusers" or self.report is None:
            return ""
        ours = (self.world, family, mode, size, "featherflux", 1)
        for r in self.report.rows:
            if (r.ranks, r.family, r.mode, r.size, r.impl, r.batch) == ours and r.seconds:
                return f"featherflux {mode}: {seconds / r.seconds:.2f}x faster"
        return ""

    def too_big(self, config: DiTConfig, layout, tokens: int, batch: int) -> str | None:
        if self.device.type != "cuda":
            return None
        need = estimate_bytes(config, layout, tokens, self.args.txt_tokens, batch, 2)
        have = torch.cuda.get_device_properties(self.device).total_memory * MEMORY_HEADROOM
        if need <= have:
            return None
        return f"needs about {need / GiB:.0f} GiB per rank, more than {MEMORY_HEADROOM:.0%} of this device's"

    def measure(self, model, call, config: DiTConfig, side: int, batch: int) -> tuple[float, float | None]:
        inputs = step_inputs(config, side, self.args.txt_tokens, batch, self.device, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            seconds = seconds_per_step(lambda: call(model, inputs), self.device, self.args.warmup, self.args.steps)
        peak = torch.cuda.max_memory_allocated(self.device) / GiB if self.device.type == "cuda" else None
        return seconds, peak

    def mesh(self, mode: str, layout, degree: int | None, config: DiTConfig):
        if layout not in self.meshes:
            device = str(self.device)
            self.meshes[layout] = init_mesh(mode, config.num_heads, degree, device, mlp_hidden=config.mlp_hidden_dim)
        return self.meshes[layout]

    def build_featherflux(self, config: DiTConfig, mode: str, layout, degree: int | None):
        backend = attention.select("auto", self.device, self.dtype)
        if mode == "single":
            dit = build_transformer(config, device=self.device, dtype=self.dtype)
            dit.set_attention(backend)
            return dit
        mesh = self.mesh(mode, layout, degree, config)
        if mesh.tensor == 1:
            dit = build_transformer(config, device=self.device, dtype=self.dtype)
            dit.set_attention(backend)
            return ParallelDiT(dit, mesh)
        dit = build_transformer(config, device="meta", dtype=self.dtype)  # sliced before any memory is used
        dit.set_attention(backend)
        model = ParallelDiT(dit, mesh).to_empty(device=self.device)
        fill_random(model, self.device, seed=0)  # the whole layers (embedders, modulation) equal on every rank
        return model

    @staticmethod
    def call_featherflux(model, inputs):
        return model(*inputs)

    def build_diffusers(self, config: DiTConfig, mode: str, layout, degree: int | None):
        from diffusers import ContextParallelConfig, Flux2Transformer2DModel, TensorParallelConfig
        from diffusers.utils import logging as diffusers_logging

        from featherflux.weights.transformer import config_to_diffusers

        diffusers_logging.set_verbosity_error()  # enable_parallelism's "experimental" warning on every rank
        parallel = None
        if mode != "single":  # the mesh first: a rank that fails to make its model must not leave others in it
            _, tensor, ulysses, ring = layout
            key = (mode == "tensor", tensor, ulysses, ring)
            if key not in self.device_meshes:
                from torch.distributed.device_mesh import init_device_mesh

                shape, names = ((tensor,), ("tp",)) if mode == "tensor" else ((ring, ulysses), ("ring", "ulysses"))
                self.device_meshes[key] = init_device_mesh("cuda", shape, mesh_dim_names=names)
            if mode == "tensor":
                parallel = TensorParallelConfig(tp_degree=tensor, mesh=self.device_meshes[key])
            else:
                parallel = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=self.device_meshes[key])
        kwargs = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), default_dtype(self.dtype), torch.device(self.device):
            torch.manual_seed(0)  # the same weights on every rank, as context parallelism assumes
            model = Flux2Transformer2DModel(**kwargs).eval().requires_grad_(False)
        model.set_attention_backend(self.args.diffusers_backend)
        if parallel is None:
            return model
        model.enable_parallelism(config=parallel)
        return model

    @staticmethod
    def call_diffusers(model, inputs):
        x, x_ids, t, ctx, ctx_ids, guidance = inputs
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids,
                     guidance=guidance, return_dict=False)[0]  # fmt: skip


# --- starting the ranks ----------------------------------------------------------------------------------------


def header(args) -> dict:
    version = None
    if importlib.util.find_spec("diffusers") is not None:
        version = importlib.metadata.version("diffusers")
    return {
        "device": device_name("cuda") if args.cuda else "CPU (gloo)",
        "dtype": "float32" if args.cpu else "bfloat16",
        "torch": torch.__version__,
        "diffusers": version,
        "attention": attention.select("auto", args.device_type, torch.float32 if args.cpu else torch.bfloat16).name,
        "txt_tokens": args.txt_tokens,
        "diffusers_backend": args.diffusers_backend,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak": args.cuda,
    }


def threads(world: int) -> None:
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def bench_ranks(args, head: dict) -> None:
    """Every rank, in a process group that is up."""
    if not args.cuda:
        threads(dist.get_world_size())
    Bench(args, head).run()


def _spawned(rank: int, world: int, store: str, args, head: dict) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    if args.cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if args.cuda else "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        bench_ranks(args, head)
    finally:
        dist.destroy_process_group()


def spawn_all(args, head: dict) -> None:
    """The single-command form: each rank count in turn, in fresh processes."""
    for path in (args.out / f"{STEM}.json", args.out / f"{STEM}.md"):
        path.unlink(missing_ok=True)
    available = torch.cuda.device_count() if args.cuda else None
    for world in args.ranks:
        if available is not None and world > available:
            note = f"skipped: {world} ranks need {world} GPUs; {available} visible"
            Report(args.out, head, None).add(Row(world, "all", None, "all", "all", note=note))
            continue
        with tempfile.TemporaryDirectory() as scratch:
            try:
                mp.spawn(_spawned, args=(world, f"{scratch}/store", args, head), nprocs=world, join=True)
            except Exception as err:  # noqa: BLE001 (a rank count that dies is a row; the next one still runs)
                note = f"skipped: the processes of this rank count failed: {why(err)}"
                Report(args.out, head, None).add(Row(world, "all", None, "all", "all", note=note))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU processes on gloo, the tiny demo DiT, in seconds")
    parser.add_argument("--ranks", type=int, nargs="*", default=list(RANKS), help="rank counts (not under torchrun)")
    parser.add_argument("--modes", nargs="*", choices=PARALLEL_MODES, default=list(PARALLEL_MODES))
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES), help=f"default: {' '.join(GPU_FAMILIES)}")
    parser.add_argument("--sizes", type=int, nargs="*", help="pixels per side; default 1024 2048 (--cpu: 64 128)")
    parser.add_argument("--txt-tokens", type=int, help="default 512 (--cpu: 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 2 (--cpu: 1)")
    parser.add_argument("--budget", type=float, default=900, help="seconds per rank count; later rows are skipped")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait for a rank")
    parser.add_argument("--no-diffusers", action="store_true", help="featherflux's rows only")
    parser.add_argument(
        "--diffusers-backend",
        default="_native_cudnn",
        help="diffusers' set_attention_backend for every diffusers row (its ring needs one that returns the LSE: "
        "_native_cudnn, _native_flash, flash, ...; not native)",
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for multi_gpu.json and multi_gpu.md")
    args = parser.parse_args(argv)
    args.cuda = not args.cpu and torch.cuda.is_available()
    args.device_type = "cuda" if args.cuda else "cpu"
    if not args.cpu and not args.cuda:
        parser.error("no CUDA device; use --cpu for gloo processes on the CPU")
    args.families = args.families or list(CPU_FAMILIES if args.cpu else GPU_FAMILIES)
    args.sizes = args.sizes or list(CPU_SIZES if args.cpu else GPU_SIZES)
    args.txt_tokens = args.txt_tokens or (16 if args.cpu else 512)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 2)
    for family in args.families:
        per_token = FAMILIES[family].autoencoder.downsample_factor * FAMILIES[family].autoencoder.patch_size
        bad = [s for s in args.sizes if s % per_token]
        if bad:
            parser.error(f"{family} takes sizes that are multiples of {per_token} pixels, not {bad}")
    head = header(args)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this launch's rank count only
        if args.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=args.timeout)
        dist.init_process_group("nccl" if args.cuda else "gloo", timeout=timeout)
        try:
            bench_ranks(args, head)
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            print(f"wrote {args.out / f'{STEM}.json'} and {args.out / f'{STEM}.md'}")
        return 0
    spawn_all(args, head)
    print(f"wrote {args.out / f'{STEM}.json'} and {args.out / f'{STEM}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
