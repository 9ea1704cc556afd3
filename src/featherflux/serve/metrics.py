"""What the image server counts, and the Prometheus text `/metrics` returns."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    step_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))
    step_count: int = 0
    step_sum: float = 0.0
    images_total: int = 0
    image_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    call_seconds: float = 10.0  # running average of seconds per pipeline call, for Retry-After

    def observe_step(self, seconds: float) -> None:
        self.step_count += 1
        self.step_sum += seconds
        for i, bound in enumerate(STEP_BUCKETS):
            if seconds <= bound:
                self.step_buckets[i] += 1

    def observe_images(self, count: int) -> None:
        now = time.monotonic()
        self.images_total += count
        self.image_times.extend([now] * count)

    def images_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.image_times if now - t <= window]
        return len(recent) / window


def prometheus_text(queue) -> str:
    """The metrics of a `serve.queue.JobQueue`, plus the CUDA memory PyTorch holds on each device."""
    m = queue.metrics
    lines = [
        "# HELP featherflux_queue_depth Jobs waiting to run.",
        "# TYPE featherflux_queue_depth gauge",
        f"featherflux_queue_depth {queue.depth()}",
        "# HELP featherflux_jobs Jobs the server knows, by state.",
        "# TYPE featherflux_jobs gauge",
    ]
    lines += [f'featherflux_jobs{{state="{state}"}} {count}' for state, count in queue.counts().items()]
    lines += [
        "# HELP featherflux_step_seconds Wall time of one denoising step (whole batch).",
        "# TYPE featherflux_step_seconds histogram",
    ]
    lines += [f'featherflux_step_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(STEP_BUCKETS, m.step_buckets)]
    lines += [
        f'featherflux_step_seconds_bucket{{le="+Inf"}} {m.step_count}',
        f"featherflux_step_seconds_sum {m.step_sum:.6f}",
        f"featherflux_step_seconds_count {m.step_count}",
        "# HELP featherflux_images_total Images generated.",
        "# TYPE featherflux_images_total counter",
        f"featherflux_images_total {m.images_total}",
        "# HELP featherflux_images_per_second Images generated per second over the last minute.",
        "# TYPE featherflux_images_per_second gauge",
        f"featherflux_images_per_second {m.images_per_second():.4f}",
    ]
    if torch.cuda.is_available():
        lines += [
            "# HELP featherflux_device_memory_bytes CUDA memory held by PyTorch.",
            "# TYPE featherflux_device_memory_bytes gauge",
        ]
        for i in range(torch.cuda.device_count()):
            for kind, value in (
                ("allocated", torch.cuda.memory_allocated(i)),
                ("reserved", torch.cuda.memory_reserved(i)),
                ("peak_allocated", torch.cuda.max_memory_allocated(i)),
            ):
                lines.append(f'featherflux_device_memory_bytes{{device="cuda:{i}",kind="{kind}"}} {value}')
    return "\n".join(lines) + "\n"
