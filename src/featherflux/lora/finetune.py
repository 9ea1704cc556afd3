"""`featherflux train-lora` end to end on a loaded pipeline: cache the data, free the encoders, train, validate."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from featherflux.errors import UserError
from featherflux.images import save_png
from featherflux.lora.data import cache_dataset, cache_key, free_encoders
from featherflux.lora.train import CachedDataset, TrainConfig, TrainResult, train
from featherflux.memory.quant import quantize


@dataclass
class FinetuneSetup:
    """Everything about a run that is neither the pipeline nor the optimisation itself."""

    data: str
    output: str
    resolution: int = 512
    buckets: bool = True
    max_sequence_length: int | None = None  # None: the family's
    quantize: str | None = None  # "int8" | "nf4": frozen quantized base (QLoRA)
    validation_prompt: str | None = None
    validation_steps: int | None = None  # sampling steps of validation images; None: the family's


def finetune(pipe, setup: FinetuneSetup, config: TrainConfig) -> TrainResult:
    """Train `pipe`'s DiT (a `Flux2Pipeline`, loaded with the dtype the base weights should have; adapters always
    train in fp32). Its encoders are freed once the data is cached."""
    if not Path(setup.data).is_dir():
        raise UserError(f"training data folder not found: {setup.data}")
    output = Path(setup.output)
    output.mkdir(parents=True, exist_ok=True)
    if setup.quantize and config.mode == "full":
        raise UserError("--quantize trains a LoRA on a frozen quantized base; it cannot be combined with --mode full")
    length = setup.max_sequence_length or pipe.family.text_encoder.max_length
    prompts = (setup.validation_prompt,) if setup.validation_prompt else ()
    key = cache_key(setup.data, setup.resolution, setup.buckets, length, pipe.model_id) + repr(prompts)
    cache_path = output / "cache.safetensors"
    cached = CachedDataset.load(cache_path, key)
    if cached is None:
        data, extra, report = cache_dataset(
            pipe,
            setup.data,
            resolution=setup.resolution,
            buckets=setup.buckets,
            max_sequence_length=length,
            extra_prompts=prompts,
        )
        print(f"training data: {report.summary()}", file=sys.stderr)
        data.save(cache_path, extra, key)
    else:
        data, extra = cached
        print(f"training data: {len(data)} cached samples from {cache_path}", file=sys.stderr)
    free_encoders(pipe)  # the encoders are done: latents and embeddings are cached
    if setup.quantize:
        quantize(pipe.transformer, setup.quantize)

    validate = None
    if setup.validation_prompt:
        steps = setup.validation_steps or pipe.family.default_steps

        def validate(step: int) -> None:
            image = pipe(
                prompt_embeds=extra[setup.validation_prompt].to(pipe.device),
                height=setup.resolution,
                width=setup.resolution,
                num_inference_steps=steps,
                seed=config.seed,
                show_progress=False,
            ).images[0]
            save_png(
                image,
                output / "validation" / f"step-{step:07d}.png",
                {"prompt": setup.validation_prompt, "step": step, "seed": config.seed, "model": pipe.model_id},
            )

    config = replace(config, base_model=config.base_model or pipe.model_id)
    return train(pipe.transformer, data, config, output, validate=validate)
