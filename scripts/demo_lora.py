"""Teach the demo model a colour it has never seen with a LoRA trained in a few minutes on CPU.

`python scripts/demo_lora.py` renders held-out captions with the new colour (`scenes.NOVEL_COLOR`, "pink") before
and after training, and the base held-out captions with the LoRA loaded (nothing else should be forgotten). The
LoRA is trained by `train-lora`'s machinery on rendered scenes: three in four show the new colour (training-split
captions only), one in four a known colour.
"""

import argparse
import time
from pathlib import Path

from featherflux.demo import evaluate, scenes
from featherflux.demo.train import write_dataset
from featherflux.lora.finetune import FinetuneSetup, finetune
from featherflux.lora.load import load_lora
from featherflux.lora.train import TrainConfig
from featherflux.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("~/.cache/featherflux/demo-lora"),
                        help="folder for the data and the LoRA")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n", type=int, default=64, help="captions rendered per evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work = args.work.expanduser()

    pipe = load_pipeline("demo")
    generate = evaluate.PipelineGenerator(pipe, seed=args.seed)
    novel = (scenes.NOVEL_COLOR,)
    before = evaluate.evaluate(generate, n=args.n, colors=novel)
    print(f"before: {before.summary()}")

    data = args.work / f"scenes-{args.images}-{args.seed}"
    if not data.is_dir():
        new = args.images * 3 // 4
        write_dataset(data, scenes.sample(scenes.split("train", novel), new, args.seed)
                      + scenes.sample(scenes.split("train"), args.images - new, args.seed + 1))
    config = TrainConfig(mode="lora", steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
                         rank=args.rank, alpha=float(args.rank), shift_steps=pipe.family.default_steps, seed=args.seed,
                         base_model="demo")
    output = args.work / f"lora-{args.steps}-{args.rank}-{args.learning_rate}-{args.seed}"
    start = time.perf_counter()
    setup = FinetuneSetup(data=str(data), output=str(output), resolution=scenes.IMAGE_SIZE, buckets=False)
    finetune(load_pipeline("demo"), setup, config)  # a pipeline of its own: training frees its encoders
    minutes = (time.perf_counter() - start) / 60

    load_lora(pipe.transformer, output / "lora.safetensors")
    after = evaluate.evaluate(generate, n=args.n, colors=novel)
    known = evaluate.evaluate(generate, n=args.n)
    print(f"LoRA trained in {minutes:.1f} min ({args.steps} steps, rank {args.rank}): {output / 'lora.safetensors'}")
    print(f"before: {before.summary()}")
    print(f"after:  {after.summary()}")
    print(f"known colours with the LoRA: {known.summary()}")


if __name__ == "__main__":
    main()
