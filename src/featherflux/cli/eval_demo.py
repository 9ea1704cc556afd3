"""`featherflux eval-demo`: render held-out demo captions and print how many pictures match their caption."""

from __future__ import annotations

import argparse
import json
import time

from featherflux.demo import scenes
from featherflux.demo.evaluate import PipelineGenerator, evaluate
from featherflux.pipeline import load_pipeline
from featherflux.request import CACHE_METHODS, DEFAULT_CACHE_THRESHOLD


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-demo",
        help="score the demo model's prompt adherence on held-out captions",
        description="Render held-out captions with the demo model (or a compatible one) and check each picture's "
        "shape, colour, background and position with a deterministic measurement.",
    )
    p.add_argument("--n", type=int, default=200, help="number of held-out captions to render (default 200)")
    p.add_argument("--model", default="demo", help="pipeline folder or family name (default: the packaged demo)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--lora", default=None, help="a LoRA file to load before rendering")
    p.add_argument(
        "--novel", action="store_true", help=f"use captions with the novel colour {scenes.NOVEL_COLOR!r} (LoRA demo)"
    )
    p.add_argument("--failures", type=int, default=0, help="print up to this many failed captions and readings")
    p.add_argument("--cache", choices=CACHE_METHODS, help="render with step caching, to measure what it costs")
    p.add_argument("--cache-threshold", type=float, metavar="X", help=f"with --cache (default {DEFAULT_CACHE_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the scores, DiT passes and time")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model)
    if args.lora:
        pipe.load_lora(args.lora)
    colors = (scenes.NOVEL_COLOR,) if args.novel else scenes.BASE_COLORS
    start = time.perf_counter()
    generate = PipelineGenerator(
        pipe, args.steps, args.seed, cache=args.cache, cache_threshold=args.cache_threshold, show_progress=False
    )
    report = evaluate(generate, n=args.n, colors=colors)
    seconds = time.perf_counter() - start
    dit_calls = sum(generate.dit_calls) / len(generate.dit_calls)  # per batch of captions, like `steps`
    print(f"{report.summary()}; {dit_calls:.1f} DiT passes for {generate.steps} steps; "
          f"{seconds:.1f} s ({seconds / report.n:.3f} s/image)")
    for caption, reading in report.failures[: args.failures]:
        print(f"  {caption!r}: read {reading}")
    if args.json:
        scores = {"adherence": report.adherence, "shape": report.shape, "colour": report.color,
                  "background": report.background, "position": report.position}
        print(json.dumps(scores | {"dit_calls": dit_calls, "steps": generate.steps, "n": report.n,
                                   "seconds": round(seconds, 2)}))
    return 0
