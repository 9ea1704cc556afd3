"""Step caching on the demo: the first-block cache against a TaylorSeer-style forecast, at matched DiT passes.

The issue that added step caching asked for a second method if one measured better. This is that measurement.
Each row renders the demo's held-out captions at 16 steps (seeds as `featherflux eval-demo`) and prints the DiT
passes per image, prompt adherence (the demo's deterministic reader), the mean absolute pixel difference (0-255)
from the uncached images of the same seeds, and the wall time:
- `first-block X`: featherflux's cache (`cache="first-block"`, threshold X; it decides per step from the first
  double block's residual, one host read per step);
- `forecast W/K`: a TaylorSeer-style forecast on a fixed schedule (no host read): the whole DiT runs on the first W
  steps and then on every K-th; other steps extrapolate the velocity to first order in t from the last two full
  passes (`reuse W/K`: repeat the last velocity, zeroth order). It lives here only, since it measured worse.

    python benchmarks/step_cache_demo.py [--n 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from featherflux.demo import scenes
from featherflux.demo.evaluate import heldout_prompts, score
from featherflux.pipeline import load_pipeline

STEPS = 16
BATCH = 25


class Forecast(nn.Module):
    """A DiT whose velocity, between full passes on a fixed schedule, is extrapolated from the last two."""

    def __init__(self, dit: nn.Module, warmup: int, interval: int, order: int):
        super().__init__()
        self.dit, self.warmup, self.interval, self.order = dit, warmup, interval, order
        self.step, self.passes, self.history = 0, 0, []

    def forward(self, x, ids, t, ctx, ctx_ids, guidance=None, step_cache=None):
        step, self.step = self.step, self.step + 1
        if step < self.warmup or (step - self.warmup) % self.interval == 0:
            v = self.dit(x, ids, t, ctx, ctx_ids, guidance)
            self.passes += 1
            self.history = [*self.history[-1:], (t, v)]
            return v
        (t0, v0), (t1, v1) = self.history
        if self.order == 0:
            return v1
        return v1 + (v1 - v0) * ((t - t1) / (t1 - t0))[:, None, None]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="held-out captions (default 200)")
    args = parser.parse_args()
    pipe = load_pipeline("demo")
    dit = pipe.transformer
    prompts = heldout_prompts(args.n)

    def render(forecast: tuple[int, int, int] | None = None, **call):
        images, passes, start = [], [], time.perf_counter()
        for first in range(0, args.n, BATCH):
            captions = [p.caption for p in prompts[first : first + BATCH]]
            generators = [torch.Generator().manual_seed(first + i) for i in range(len(captions))]
            if forecast is not None:
                pipe.transformer = Forecast(dit, *forecast)
            result = pipe(
                prompt=captions, height=scenes.IMAGE_SIZE, width=scenes.IMAGE_SIZE, num_inference_steps=STEPS,
                generator=generators, show_progress=False, **call,
            )  # fmt: skip
            passes.append(result.dit_calls if forecast is None else pipe.transformer.passes)
            images += result.images
        pipe.transformer = dit
        return images, float(np.mean(passes)), time.perf_counter() - start

    uncached, _, seconds = render()
    reference = np.stack([np.asarray(image, dtype=np.float32) for image in uncached])

    def row(name: str, images, passes: float, seconds: float) -> None:
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images])
        adherence = score(images, prompts).adherence
        difference = np.abs(pixels - reference).mean()
        print(f"| {name} | {passes:.2f} | {adherence:.1%} | {difference:.2f} | {seconds:.1f} |", flush=True)

    print(f"{args.n} held-out captions, {STEPS} steps\n")
    print("| method | DiT passes | adherence | mean abs pixel difference from uncached | seconds |")
    print("| --- | --- | --- | --- | --- |")
    row("no cache", uncached, STEPS, seconds)
    for threshold in (0.12, 0.2, 0.3, 0.5):
        row(f"first-block {threshold}", *render(cache="first-block", cache_threshold=threshold))
    for warmup, interval in ((2, 2), (3, 2), (2, 3), (3, 3), (2, 4)):
        row(f"forecast {warmup}/{interval}", *render((warmup, interval, 1)))
    row("reuse 2/2", *render((2, 2, 0)))


if __name__ == "__main__":
    main()
