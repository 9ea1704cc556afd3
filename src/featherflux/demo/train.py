"""The demo model's training recipe: from a seed to the shipped `demo/weights/` folder on a laptop CPU.

Stages (each seeded from the recipe's seed):
  1. autoencoder: the FLUX.2 autoencoder architecture at the demo's size (4x downsampling, one group per
     GroupNorm: with 16 channels, more groups would normalise the flat colours away), trained on whole scenes with an
     L1 + MSE reconstruction loss on posterior samples and a KL term (1e-3: with 1e-4 the autoencoder is as exact,
     but the DiT drew shapes less well on its latents); then its BatchNorm statistics are measured on latents of
     training scenes, as FLUX.2's `normalize` expects.
  2. text encoder: a randomly initialised Qwen3 at the demo's size, frozen. Captions have a fixed layout (see
     `scenes`), so per-token hidden states already tell every caption apart; nothing needs training.
  3. transformer: full fine-tuning of a freshly initialised demo DiT with `featherflux.lora.train` on rendered
     scenes of the training split, one caption in ten dropped to the empty caption, so that the pipeline's true
     CFG (klein base's, against the empty prompt) has an unconditional prediction to extrapolate from. No caption
     names the new colour `scenes.NOVEL_COLOR`: the LoRA demonstration teaches it. The autoencoder, a codec like
     FLUX.2's, sees pictures of every colour.
The result is written in diffusers' pipeline layout and loads with `load_pipeline` like any FLUX.2 checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from featherflux.demo import scenes
from featherflux.demo.tokenizer import build_tokenizer
from featherflux.lora.finetune import FinetuneSetup, finetune
from featherflux.lora.train import TrainConfig
from featherflux.model.autoencoder import AutoEncoder
from featherflux.model.config import FamilyConfig, get_family
from featherflux.model.dit import Flux2
from featherflux.pipeline import load_pipeline
from featherflux.weights import load_transformer, save_autoencoder, save_transformer

WEIGHTS_DIR = Path(__file__).parent / "weights"
WORK_DIR = Path("~/.cache/featherflux/demo-train")  # data, caches and finished stages

# The scheduler config FLUX.2 checkpoints ship; our sampler derives the same schedule without reading it.
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.42.1",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "_diffusers_version": "0.42.1",
    "is_distilled": get_family("demo").guidance_distilled,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    ae_steps: int = 2500
    ae_batch: int = 8
    ae_lr: float = 2e-3
    ae_kl_weight: float = 1e-3
    ae_edge_weight: float = 8.0  # extra loss weight on pixels at colour edges (star tips are a few pixels)
    ae_images: int = 3000  # distinct scenes the autoencoder sees
    ae_stats_images: int = 512  # scenes the latent BatchNorm statistics are measured on
    dit_images: int = 3000
    dit_steps: int = 6000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    dit_warmup: int = 100  # then cosine decay to zero at dit_steps
    dit_shift_steps: int = 8  # timestep sampling follows FLUX.2's schedule shift at this many sampling steps
    dit_caption_dropout: float = 0.1  # trains the empty-caption prediction that true CFG extrapolates from


def render_tensor(pairs: list[tuple[scenes.Scene, int]]) -> torch.Tensor:
    """(B, 3, S, S) float images in [-1, 1] for (scene, seed) pairs."""
    array = np.stack([np.asarray(scenes.render(scene, seed)) for scene, seed in pairs])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_autoencoder(family: FamilyConfig, recipe: Recipe) -> AutoEncoder:
    """Stage 1: the autoencoder on whole scenes of every colour (it is the image codec, like FLUX.2's, which encodes
    colours no caption names; the new colour stays new to the DiT and the text path)."""
    torch.manual_seed(recipe.seed)
    ae = AutoEncoder(family.autoencoder)
    data = render_tensor(scenes.sample(scenes.split("train", tuple(scenes.COLORS)), recipe.ae_images, recipe.seed))
    optimizer = torch.optim.AdamW(ae.parameters(), lr=recipe.ae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.ae_lr, total_steps=recipe.ae_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(recipe.seed)
    z = family.autoencoder.z_channels
    ae.train()
    for _ in (bar := tqdm(range(recipe.ae_steps), desc="autoencoder", unit="step")):
        x = data[torch.randint(0, len(data), (recipe.ae_batch,), generator=generator)]
        mean, logvar = ae.encoder(x).split(z, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        sample = mean + torch.randn(mean.shape, generator=generator) * (0.5 * logvar).exp()
        error = ae.decoder(sample) - x
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        weight = 1.0 + recipe.ae_edge_weight * edges(x)
        loss = (weight * (error.abs() + error.square())).mean() / weight.mean() + recipe.ae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Without clipping, the early steps overshoot and training loses hundreds of steps recovering.
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ae.eval().requires_grad_(False)
    stats_pairs = scenes.sample(scenes.split("train"), recipe.ae_stats_images, recipe.seed + 1)
    set_latent_statistics(ae, render_tensor(stats_pairs))
    return ae


def edges(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): 1 where a pixel's 3x3 neighbourhood is not one flat colour, else 0."""
    spread = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)
    return (spread.amax(dim=1, keepdim=True) > 0.05).float()


@torch.no_grad()
def set_latent_statistics(ae: AutoEncoder, images: torch.Tensor) -> None:
    """Fill `bn`'s running statistics with the per-channel mean and variance of patchified latents."""
    z = torch.cat([ae.encode(batch) for batch in images.split(64)])
    p = ae.config.patch_size
    B, C, H, W = z.shape
    patched = z.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, -1)
    ae.bn.running_mean.copy_(patched.mean(dim=(0, 2)))
    ae.bn.running_var.copy_(patched.var(dim=(0, 2)))
    ae.bn.num_batches_tracked.fill_(1)


def build_text_encoder(family: FamilyConfig, tokenizer, seed: int):
    """A randomly initialised, seeded Qwen3ForCausalLM at the demo's size (transformers' own init)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM  # imported on use: transformers takes seconds to load

    te = family.text_encoder
    if len(tokenizer) > te.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the config's vocab_size {te.vocab_size}")
    config = Qwen3Config(
        vocab_size=te.vocab_size,
        hidden_size=te.hidden_size,
        intermediate_size=te.intermediate_size,
        num_hidden_layers=te.num_layers,
        num_attention_heads=te.num_heads,
        num_key_value_heads=te.num_kv_heads,
        head_dim=te.head_dim,
        max_position_embeddings=te.max_length,
        tie_word_embeddings=te.tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval().requires_grad_(False)


def write_pipeline(folder: Path, *, transformer, autoencoder: AutoEncoder, text_encoder, tokenizer) -> None:
    """Write a diffusers-layout FLUX.2 klein pipeline folder, replacing `folder` atomically."""

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    save_transformer(transformer, staging / "transformer")
    save_autoencoder(autoencoder, staging / "vae")
    text_encoder.save_pretrained(staging / "text_encoder")
    tokenizer.save_pretrained(staging / "tokenizer")
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (staging / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old)
    else:
        os.replace(staging, folder)


def cached_autoencoder(family: FamilyConfig, recipe: Recipe, work: Path) -> AutoEncoder:
    """Stage 1, or its result from `work` if an earlier run of the same recipe left it there."""
    path = work / f"autoencoder-{recipe_key(recipe, family.autoencoder, 'ae_')}.safetensors"
    if path.exists():
        return _load_autoencoder(family, path)
    start = time.perf_counter()
    ae = train_autoencoder(family, recipe)
    print(f"autoencoder: {time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU so far")
    _save_autoencoder(ae, path)
    return ae


def _load_autoencoder(family: FamilyConfig, path: Path) -> AutoEncoder:
    ae = AutoEncoder(family.autoencoder)
    ae.load_state_dict(load_file(path))
    return ae.eval().requires_grad_(False)


def _save_autoencoder(ae: AutoEncoder, path: Path) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def recipe_key(recipe: Recipe, config, prefix: str | tuple[str, ...] = "") -> str:
    """A short hash of a config and the recipe fields starting with `prefix` (all by default), naming a stage's
    output in the work folder, so that a changed setting retrains instead of reusing a stale result."""
    fields = {k: v for k, v in asdict(recipe).items() if k.startswith(prefix) or k == "seed"}
    return hashlib.sha1(repr((sorted(fields.items()), config)).encode()).hexdigest()[:10]


def write_dataset(folder: Path, pairs: list[tuple[scenes.Scene, int]]) -> None:
    """Rendered scenes as PNG files with same-name .txt captions: the layout `train-lora` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, seed) in enumerate(pairs):
        scenes.render(scene, seed).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(scene.caption + "\n")


def train_transformer(family: FamilyConfig, recipe: Recipe, work: Path, *, autoencoder, text_encoder, tokenizer):
    """Stage 3: full fine-tuning of a seeded random demo DiT with the LoRA trainer's machinery (mode="full")."""
    torch.manual_seed(recipe.seed)
    write_pipeline(work / "base", transformer=Flux2(family.dit), autoencoder=autoencoder, text_encoder=text_encoder,
                   tokenizer=tokenizer)
    data = work / f"scenes-{recipe.dit_images}-{recipe.seed}"
    if not data.is_dir():
        write_dataset(data, scenes.sample(scenes.split("train"), recipe.dit_images, recipe.seed + 2))
    networks = (family.dit, family.autoencoder, family.text_encoder)
    run = work / f"transformer-{recipe_key(recipe, networks, ('ae_', 'dit_'))}"
    setup = FinetuneSetup(data=str(data), output=str(run), resolution=scenes.IMAGE_SIZE, buckets=False)
    config = TrainConfig(mode="full", steps=recipe.dit_steps, learning_rate=recipe.dit_lr, lr_schedule="cosine",
                         warmup_steps=recipe.dit_warmup, batch_size=recipe.dit_batch,
                         shift_steps=recipe.dit_shift_steps, caption_dropout=recipe.dit_caption_dropout,
                         seed=recipe.seed, checkpoint_every=1000, base_model="featherflux demo (random init)")
    finetune(load_pipeline(work / "base"), setup, config)
    return load_transformer(run / "transformer")


def main(out: Path = WEIGHTS_DIR, recipe: Recipe = Recipe(), work: Path = WORK_DIR) -> None:
    work = work.expanduser()
    family = get_family("demo")
    start = time.perf_counter()
    autoencoder = cached_autoencoder(family, recipe, work)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(family, tokenizer, recipe.seed)
    transformer = train_transformer(family, recipe, work, autoencoder=autoencoder, text_encoder=text_encoder,
                                    tokenizer=tokenizer)
    write_pipeline(out, transformer=transformer, autoencoder=autoencoder, text_encoder=text_encoder,
                   tokenizer=tokenizer)
    print(f"wrote {out} after {time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU")


def cli(argv: list[str] | None = None) -> None:
    """`python -m featherflux.demo.train` / `python scripts/train_demo.py`: every Recipe field is an option."""
    parser = argparse.ArgumentParser(description="Reproduce the shipped demo model from a seed.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                        help=f"pipeline folder to write (default {WEIGHTS_DIR})")
    parser.add_argument("--work", type=Path, default=WORK_DIR,
                        help="folder for the data, caches and finished stages (reused by a rerun)")
    for f in fields(Recipe):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    main(args.out, replace(Recipe(), **{f.name: getattr(args, f.name) for f in fields(Recipe)}), args.work)


if __name__ == "__main__":
    cli()
