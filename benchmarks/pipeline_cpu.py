"""End-to-end generation time and prompt-encoder load size, featherflux vs diffusers, same weights, same process.

    python benchmarks/pipeline_cpu.py [--family demo] [--steps 8] [--size 64] [--batch 2] [--refs 1] [--repeats 3]

Builds a random-weight pipeline with the shapes of a small named family (default: demo) in diffusers' layout,
loads it with both libraries, and prints for each: load seconds, median seconds per call (text encoding,
reference encoding, denoising and decoding included), and text-encoder parameters held in memory (featherflux
loads only the stacked layers). Also prints the largest pixel difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--refs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from diffusers import DiffusionPipeline

    from featherflux.pipeline import load_pipeline
    from tests.tiny import save_family_pipeline

    folder = Path(tempfile.mkdtemp()) / args.family
    save_family_pipeline(args.family, folder)
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.refs)]
    prompts = [f"a red circle above a blue square, number {i}" for i in range(args.batch)]

    load_ours, ours = timed(lambda: load_pipeline(folder), 1)
    load_theirs, theirs = timed(lambda: DiffusionPipeline.from_pretrained(str(folder)), 1)
    theirs.set_progress_bar_config(disable=True)
    out_layers = ours.family.text_encoder.out_layers
    common = dict(prompt=prompts, image=refs or None, height=args.size, width=args.size,
                  num_inference_steps=args.steps, guidance_scale=ours.family.default_guidance,
                  max_sequence_length=ours.family.text_encoder.max_length,
                  output_type="np")
    run_ours, a = timed(lambda: ours(seed=0, show_progress=False, **common).images, args.repeats)
    run_theirs, b = timed(
        lambda: theirs(generator=torch.Generator().manual_seed(0), text_encoder_out_layers=out_layers, **common).images,
        args.repeats,
    )
    ours_te = sum(p.numel() for p in ours.prompt_encoder.model.parameters())
    theirs_te = sum(p.numel() for p in theirs.text_encoder.parameters())
    print(f"family {ours.family.name}: {args.batch} x {args.size}px, {args.steps} steps, {args.refs} reference(s), "
          f"{torch.get_num_threads()} threads")
    print(f"load          featherflux {load_ours:7.2f} s   diffusers {load_theirs:7.2f} s")
    print(f"generate      featherflux {run_ours:7.2f} s   diffusers {run_theirs:7.2f} s   "
          f"ratio {run_theirs / run_ours:.2f}x")
    print(f"text encoder  featherflux {ours_te:,} params   diffusers {theirs_te:,} params")
    print(f"max |featherflux - diffusers| = {np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    main()
