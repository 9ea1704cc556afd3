"""The demo model's training recipe: from a seed to the shipped `demo/weights/` folder on a laptop CPU.

Stages (each seeded from the recipe's seed):
  1. autoencoder: the FLUX.2 autoencoder architecture at the demo's size, trained on random crops of scenes
     (it is fully convolutional, so small crops teach it edges and colours at a quarter of the cost) with an L1 + MSE
     reconstruction loss on posterior samples and a light KL term; then its BatchNorm statistics are measured on
     full-size latents, as FLUX.2's `normalize` expects. 1b: the decoder alone is fine-tuned on whole pictures.
  2. text encoder: a randomly initialised Qwen3 at the demo's size, frozen. Captions have a fixed layout (see
     `scenes`), so per-token hidden states already tell every caption apart; nothing needs training.
  3. transformer: full fine-tuning of a freshly initialised demo DiT with `featherflux.lora.train` on rendered
     scenes of the training split. The new colour `scenes.NOVEL_COLOR` is kept out of every stage.
The result is written in diffusers' pipeline layout and loads with `load_pipeline` like any FLUX.2 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from featherflux.demo import scenes
from featherflux.demo.tokenizer import build_tokenizer
from featherflux.model.autoencoder import AutoEncoder
from featherflux.model.config import FamilyConfig, get_family

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
    "is_distilled": True,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    ae_steps: int = 1500
    ae_batch: int = 8
    ae_crop: int = 32
    ae_lr: float = 3e-3
    ae_kl_weight: float = 1e-4
    ae_images: int = 3000  # distinct scenes the autoencoder sees (cropped)
    ae_stats_images: int = 512  # scenes the latent BatchNorm statistics are measured on
    decoder_steps: int = 2000  # full-size decoder fine-tuning on the frozen encoder's latents
    decoder_batch: int = 8
    decoder_lr: float = 1e-3
    dit_images: int = 2000
    dit_steps: int = 4000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    dit_shift_steps: int = 8  # timestep sampling follows FLUX.2's schedule shift at this many sampling steps


def render_tensor(pairs: list[tuple[scenes.Scene, int]]) -> torch.Tensor:
    """(B, 3, S, S) float images in [-1, 1] for (scene, seed) pairs."""
    array = np.stack([np.asarray(scenes.render(scene, seed)) for scene, seed in pairs])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_autoencoder(family: FamilyConfig, recipe: Recipe) -> AutoEncoder:
    torch.manual_seed(recipe.seed)
    ae = AutoEncoder(family.autoencoder)
    pairs = scenes.sample(scenes.split("train"), recipe.ae_images, recipe.seed)
    data = render_tensor(pairs)
    by_position = {p: torch.tensor([i for i, (s, _) in enumerate(pairs) if s.position == p]) for p in scenes.POSITIONS}
    optimizer = torch.optim.AdamW(ae.parameters(), lr=recipe.ae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.ae_lr, total_steps=recipe.ae_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(recipe.seed)
    z, f = family.autoencoder.z_channels, family.autoencoder.downsample_factor
    crop, size = recipe.ae_crop, data.shape[-1]
    positions = list(scenes.POSITIONS)
    ae.train()
    for step in (bar := tqdm(range(recipe.ae_steps), desc="autoencoder", unit="step")):
        # Crops aligned to the latent grid. Three batches in four are cut around the shape of one position (a random
        # crop is mostly background); the fourth is cut anywhere, so borders and corners are learnt too.
        if step % 4:
            position = positions[int(torch.randint(0, len(positions), (1,), generator=generator))]
            pool = by_position[position]
            index = pool[torch.randint(0, len(pool), (recipe.ae_batch,), generator=generator)]
            cx, cy = (c * size for c in scenes.POSITIONS[position])
            left, top = (min(max(round((c - crop / 2) / f) * f, 0), size - crop) for c in (cx, cy))
        else:
            index = torch.randint(0, len(data), (recipe.ae_batch,), generator=generator)
            top, left = (torch.randint(0, (size - crop) // f + 1, (2,), generator=generator) * f).tolist()
        x = data[index, :, top : top + crop, left : left + crop]
        mean, logvar = ae.encoder(x).split(z, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        sample = mean + torch.randn(mean.shape, generator=generator) * (0.5 * logvar).exp()
        error = ae.decoder(sample) - x
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        loss = error.abs().mean() + error.square().mean() + recipe.ae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ae.eval().requires_grad_(False)
    stats_pairs = scenes.sample(scenes.split("train"), recipe.ae_stats_images, recipe.seed + 1)
    set_latent_statistics(ae, render_tensor(stats_pairs))
    return ae


def finetune_decoder(ae: AutoEncoder, recipe: Recipe) -> AutoEncoder:
    """Stage 1b: fine-tune the decoder on whole images, decoding the frozen encoder's posterior mean as inference
    does. Crops normalise differently from whole pictures (GroupNorm statistics are per image), and the latent
    space, hence the BatchNorm statistics and everything the DiT learns, stays exactly as it was."""
    data = render_tensor(scenes.sample(scenes.split("train"), recipe.ae_images, recipe.seed + 3))
    with torch.no_grad():
        latents = torch.cat([ae.encode(batch) for batch in data.split(64)])
    optimizer = torch.optim.AdamW(ae.decoder.parameters(), lr=recipe.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.decoder_lr, total_steps=recipe.decoder_steps,
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    ae.decoder.train().requires_grad_(True)
    for _ in (bar := tqdm(range(recipe.decoder_steps), desc="decoder", unit="step")):
        index = torch.randint(0, len(data), (recipe.decoder_batch,), generator=generator)
        error = ae.decoder(latents[index]) - data[index]
        loss = error.abs().mean() + error.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ae.decoder.eval().requires_grad_(False)
    return ae


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
    from transformers import Qwen3Config, Qwen3ForCausalLM

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
    from featherflux.weights import save_autoencoder, save_transformer

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
    """Stages 1 and 1b, or their results from `work` if an earlier run of the same recipe left them there."""
    crops = work / f"autoencoder-{recipe_key(recipe, family.autoencoder, 'ae_')}.safetensors"
    final = work / f"autoencoder-{recipe_key(recipe, family.autoencoder, ('ae_', 'decoder_'))}.safetensors"
    if final.exists():
        return _load_autoencoder(family, final)
    if crops.exists():
        ae = _load_autoencoder(family, crops)
    else:
        start = time.perf_counter()
        ae = train_autoencoder(family, recipe)
        print(f"autoencoder: {time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU so far")
        _save_autoencoder(ae, crops)
    start = time.perf_counter()
    ae = finetune_decoder(ae, recipe)
    print(f"decoder: {time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU so far")
    _save_autoencoder(ae, final)
    return ae


def _load_autoencoder(family: FamilyConfig, path: Path) -> AutoEncoder:
    from safetensors.torch import load_file

    ae = AutoEncoder(family.autoencoder)
    ae.load_state_dict(load_file(path))
    return ae.eval().requires_grad_(False)


def _save_autoencoder(ae: AutoEncoder, path: Path) -> None:
    from safetensors.torch import save_file

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
    from featherflux.lora.finetune import FinetuneSetup, finetune
    from featherflux.lora.train import TrainConfig
    from featherflux.model.dit import Flux2
    from featherflux.weights import load_transformer

    torch.manual_seed(recipe.seed)
    write_pipeline(work / "base", transformer=Flux2(family.dit), autoencoder=autoencoder, text_encoder=text_encoder,
                   tokenizer=tokenizer)
    data = work / f"scenes-{recipe.dit_images}-{recipe.seed}"
    if not data.is_dir():
        write_dataset(data, scenes.sample(scenes.split("train"), recipe.dit_images, recipe.seed + 2))
    # Not keyed by dit_steps: a rerun with more steps resumes from the last checkpoint (the learning rate is constant).
    # Nor by the decoder's settings: the DiT only ever sees the encoder's latents.
    networks = (family.dit, family.autoencoder, family.text_encoder)
    run = work / f"transformer-{recipe_key(replace(recipe, dit_steps=0), networks, ('ae_', 'dit_'))}"
    setup = FinetuneSetup(model=str(work / "base"), data=str(data), output=str(run), resolution=scenes.IMAGE_SIZE,
                          buckets=False)
    config = TrainConfig(mode="full", steps=recipe.dit_steps, learning_rate=recipe.dit_lr,
                         batch_size=recipe.dit_batch, shift_steps=recipe.dit_shift_steps, seed=recipe.seed,
                         checkpoint_every=100, base_model="featherflux demo (random init)")
    finetune(setup, config)
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
    import argparse
    from dataclasses import fields

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
