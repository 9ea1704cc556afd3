"""What the planner knows about the machine: memory, matmul throughput, and copy and memory bandwidths.

Notable features:
- A GPU's speed is looked up by its name in `KNOWN_GPUS` (the common cards, from their datasheets), so an H200
  is planned as an H200 and not as an RTX 4090. A card that is not in the table is measured once per process (a
  bf16 matmul and a pinned host-to-device copy, a few hundred milliseconds) and the result is kept per device.
- Datasheet figures are peaks; the planner wants what a DiT step reaches, so dense matmul rates are scaled by
  `REACHED_FRACTION` (about what cuBLAS reaches on FLUX-sized GEMMs) and copy rates are the pinned rates PCIe
  really gives (about 80% of the link's nominal rate).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

GiB = 1024**3
REACHED_FRACTION = 0.7  # of the datasheet's dense tensor-core rate

PCIE4_GBPS = 25.0  # pinned host-to-device copies on PCIe 4.0 x16
PCIE5_GBPS = 50.0  # PCIe 5.0 x16


@dataclass(frozen=True)
class GPUSpec:
    """A card's datasheet: dense (no sparsity) bf16 and fp8 tensor-core TFLOP/s with fp32 accumulation, its memory
    bandwidth, and the pinned host-to-device rate of its usual link. fp8_tflops is 0 where there are no fp8
    tensor cores (before compute capability 8.9)."""

    bf16_tflops: float
    fp8_tflops: float
    hbm_gbps: float
    h2d_gbps: float


# Matched against torch's device name, longest key first ("H100 PCIe" before "H100"); GeForce cards are listed
# at their fp32-accumulate rate, which is half their fp16-accumulate headline figure.
KNOWN_GPUS: dict[str, GPUSpec] = {
    "B200": GPUSpec(2250, 4500, 8000, PCIE5_GBPS),
    "H200": GPUSpec(989, 1979, 4800, PCIE5_GBPS),
    "H100 PCIe": GPUSpec(756, 1513, 2000, PCIE5_GBPS),
    "H100 NVL": GPUSpec(835, 1671, 3900, PCIE5_GBPS),
    "H100": GPUSpec(989, 1979, 3350, PCIE5_GBPS),
    "H800": GPUSpec(989, 1979, 3350, PCIE5_GBPS),
    "GH200": GPUSpec(989, 1979, 4000, 400.0),  # NVLink-C2C to the Grace CPU's memory
    "A100": GPUSpec(312, 0, 2039, PCIE4_GBPS),
    "A800": GPUSpec(312, 0, 2039, PCIE4_GBPS),
    "L40S": GPUSpec(362, 733, 864, PCIE4_GBPS),
    "L40": GPUSpec(181, 362, 864, PCIE4_GBPS),
    "L4": GPUSpec(121, 242, 300, PCIE4_GBPS),
    "A10G": GPUSpec(70, 0, 600, PCIE4_GBPS),
    "A10": GPUSpec(125, 0, 600, PCIE4_GBPS),
    "RTX 6000 Ada": GPUSpec(364, 728, 960, PCIE4_GBPS),
    "RTX PRO 6000": GPUSpec(500, 1000, 1792, PCIE5_GBPS),
    "RTX 5090": GPUSpec(210, 419, 1792, PCIE5_GBPS),
    "RTX 5080": GPUSpec(113, 225, 960, PCIE5_GBPS),
    "RTX 4090": GPUSpec(165, 330, 1008, PCIE4_GBPS),
    "RTX 4080": GPUSpec(97, 195, 717, PCIE4_GBPS),
    "RTX 4070 Ti": GPUSpec(80, 160, 504, PCIE4_GBPS),
    "RTX 4060 Ti": GPUSpec(44, 88, 288, PCIE4_GBPS),
    "RTX 3090": GPUSpec(71, 0, 936, PCIE4_GBPS),
    "RTX 3080": GPUSpec(59, 0, 760, PCIE4_GBPS),
    "RTX 3060": GPUSpec(25, 0, 360, PCIE4_GBPS),
}


@dataclass(frozen=True)
class Hardware:
    """What the planner assumes about the machine. Throughputs are what a DiT step reaches, not datasheet peaks;
    the defaults are an RTX 4090's."""

    vram_bytes: int
    ram_bytes: int
    tflops: float = 150.0  # dense bf16 matmul
    h2d_gbps: float = 22.0  # pinned host-to-device copy
    hbm_gbps: float = 1000.0  # device memory bandwidth, for dequantisation traffic
    disk_gbps: float = 2.0  # NVMe read, for memory-mapped weights that do not fit in RAM
    fp8_tflops: float = 0.0  # fp8 tensor cores (compute capability 8.9+), 0 where there are none
    name: str = "assumed RTX 4090-class GPU"
    source: str = "assumed"  # "datasheet" (KNOWN_GPUS), "measured" or "assumed"

    @property
    def fp8_matmul(self) -> bool:
        return self.fp8_tflops > 0

    @property
    def reserve_bytes(self) -> int:
        """CUDA context, cuBLAS workspaces and allocator fragmentation: never available to tensors."""
        return int(0.75 * GiB + 0.04 * self.vram_bytes)

    def describe(self) -> str:
        fp8 = f"{self.fp8_tflops:.0f} fp8 TFLOP/s" if self.fp8_matmul else "no fp8 tensor cores"
        return (
            f"{self.name}: {self.vram_bytes / GiB:.0f} GiB VRAM, {self.ram_bytes / GiB:.0f} GiB RAM, "
            f"{self.tflops:.0f} bf16 TFLOP/s, {fp8}, {self.hbm_gbps:.0f} GB/s memory, "
            f"{self.h2d_gbps:.0f} GB/s host-to-device ({self.source})"
        )


def known_gpu(name: str) -> GPUSpec | None:
    """The datasheet of a card by torch's device name ("NVIDIA H200", "NVIDIA GeForce RTX 4090"), or None."""
    for key in sorted(KNOWN_GPUS, key=len, reverse=True):
        if key.lower() in name.lower():
            return KNOWN_GPUS[key]
    return None


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_MEASURED: dict[torch.device, tuple[float, float, float]] = {}  # device -> (bf16 TFLOP/s, h2d GB/s, memory GB/s)


def measure(device: torch.device | str, size: int = 4096, repeats: int = 5) -> tuple[float, float, float]:
    """(bf16 matmul TFLOP/s, host-to-device GB/s, device memory GB/s) measured on `device`, once per process.

    Best of a few timed runs of a square bf16 matmul, a host-to-device copy (pinned on CUDA) and a device-to-device
    copy of 256 MiB; on the CPU the "copies" are memcpys. Takes a few hundred milliseconds on a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _MEASURED:
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        nbytes = 256 * 2**20 if device.type == "cuda" else 32 * 2**20
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        other = torch.empty_like(dev)
        matmul = _best_seconds(lambda: a @ a, device, repeats)
        h2d = _best_seconds(lambda: dev.copy_(host, non_blocking=True), device, repeats)
        d2d = _best_seconds(lambda: other.copy_(dev), device, repeats)
        _MEASURED[device] = (2 * size**3 / matmul / 1e12, nbytes / h2d / 1e9, 2 * nbytes / d2d / 1e9)
    return _MEASURED[device]


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernel selection, first-touch of pages
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def detect_hardware() -> Hardware | None:
    """The current CUDA device (memory, and speeds from `KNOWN_GPUS` or measured) and host RAM, or None without CUDA.

    VRAM is what is free now plus what the CUDA context already holds (the reserve accounts for the context), so
    memory used by other processes is not planned for; on an idle card it is the card's size."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    free, _ = torch.cuda.mem_get_info(device)
    vram = min(props.total_memory, free + torch.cuda.memory_reserved(device) + int(0.5 * GiB))
    return gpu_hardware(props.name, (props.major, props.minor), vram, host_ram_bytes(), device)


def gpu_hardware(
    name: str, capability: tuple[int, int], vram_bytes: int, ram_bytes: int, device: int | None = None
) -> Hardware:
    """A CUDA card's `Hardware`: speeds from `KNOWN_GPUS` by name, else measured on `device` (which must be given
    for a card not in the table)."""
    fp8_cores = capability >= (8, 9)
    spec = known_gpu(name)
    if spec is not None:
        return Hardware(
            vram_bytes=vram_bytes,
            ram_bytes=ram_bytes,
            tflops=spec.bf16_tflops * REACHED_FRACTION,
            h2d_gbps=spec.h2d_gbps,
            hbm_gbps=spec.hbm_gbps,
            fp8_tflops=spec.fp8_tflops * REACHED_FRACTION if fp8_cores else 0.0,
            name=name,
            source="datasheet",
        )
    tflops, h2d, hbm = measure(torch.device("cuda", device))
    return Hardware(
        vram_bytes=vram_bytes,
        ram_bytes=ram_bytes,
        tflops=tflops,
        h2d_gbps=h2d,
        hbm_gbps=hbm,
        fp8_tflops=2 * tflops if fp8_cores else 0.0,  # every fp8-capable card so far runs fp8 at twice bf16
        name=name,
        source="measured",
    )
