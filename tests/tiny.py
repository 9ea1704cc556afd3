"""Tiny random FLUX.2 pipelines in diffusers' on-disk layout, built fully offline, for any test to load.

    from tests.tiny import tiny_pipeline_dir
    path = tiny_pipeline_dir("dev", tmp_path)          # or "klein", "klein-base", "klein-kv"
    pipe = featherflux.load_pipeline(path)             # our loader
    oracle = load_diffusers_pipeline(path)             # diffusers, the test oracle

Design choices:
- The text encoders are as deep as the real families need, so the default out layers work without overrides:
  dev's Mistral has exactly 30 layers (layer 30 is the last, so its hidden state is the post-final-norm one, the
  edge case), klein's Qwen3 has 28 (layer 28 is past the last used one, 27, and must not run).
- The autoencoder downsamples 8x like the real one (4 levels), so sizes follow the real rules (multiples of 16,
  >= 64 px), with 2 latent channels (DiT in_channels 8). Its BatchNorm statistics are random, not 0/1, so
  normalisation bugs show up.
- The scheduler config is the one real FLUX.2 checkpoints ship (dynamic shifting on), not diffusers' test default.
- Tokenizers are byte-level BPEs trained on a few strings with `tokenizers`; no hub access anywhere.
Everything is seeded, so the same kind always gives the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

KINDS = ("dev", "klein", "klein-base", "klein-kv")

TEXT_HIDDEN = 16  # text encoder width; the DiT context is 3 x this
LATENT_CHANNELS = 2  # autoencoder z channels; the DiT sees 4 x this after 2x2 patchify

# A quick pipeline call on the tiny pipelines: 64x64, 2 steps, seeded, tensors out.
CALL = {
    "prompt": "a dog is dancing",
    "height": 64,
    "width": 64,
    "num_inference_steps": 2,
    "seed": 0,
    "output_type": "pt",
    "show_progress": False,
}

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

_CORPUS = [
    "a dog is dancing",
    "a cat holding a sign that says hello world",
    "a red apple on a wooden table, photo",
    "You are an AI that reasons about image descriptions.",
    "user assistant system",
]


def _train_bpe(specials: list[str], unk: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def mistral_tokenizer():
    """A Mistral-style fast tokenizer whose chat template accepts list-of-parts content, like Pixtral's."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(specials, "<unk>"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['content'] is string %}{% set text = m['content'] %}{% else %}"
        "{% set text = m['content'] | selectattr('type','equalto','text') | map(attribute='text') | join('') %}"
        "{% endif %}"
        "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
        "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
        "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    return tokenizer


def qwen_tokenizer():
    """A Qwen2 fast tokenizer with the Qwen3 chat template's thinking switch."""
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
        "{% endif %}"
    )
    return Qwen2TokenizerFast(
        tokenizer_object=_train_bpe(specials, None),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


def _mistral3_encoder(vocab_size: int, layers: int = 30):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=24,
            max_position_embeddings=1024,
            num_attention_heads=4,
            num_hidden_layers=layers,
            num_key_value_heads=2,
            head_dim=4,
            rms_norm_eps=1e-5,
            rope_theta=1000000000.0,
            sliding_window=None,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=4,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=24,
            image_size=30,
            patch_size=6,
            num_channels=3,
        ),
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=4,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=1,
    )
    return Mistral3ForConditionalGeneration(config)


def _qwen3_encoder(vocab_size: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=24,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
    )
    return Qwen3ForCausalLM(config)


def _transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _autoencoder():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
    )
    with torch.no_grad():  # real checkpoints have non-trivial latent statistics
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def build_diffusers_pipeline(kind: str):
    """A tiny random diffusers pipeline of `kind` (one of KINDS), seeded, in fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Pipeline

    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; one of {KINDS}")
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    torch.manual_seed(0)
    vae = _autoencoder()
    torch.manual_seed(1)
    transformer = _transformer(guidance_embeds=kind == "dev")
    torch.manual_seed(2)
    if kind == "dev":
        tokenizer = mistral_tokenizer()
        text_encoder = _mistral3_encoder(len(tokenizer))
        return Flux2Pipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
    tokenizer = qwen_tokenizer()
    text_encoder = _qwen3_encoder(len(tokenizer))
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if kind == "klein-kv":
        return Flux2KleinKVPipeline(**parts)
    return Flux2KleinPipeline(**parts, is_distilled=kind == "klein")


def save_tiny_pipeline(kind: str, folder: str | Path) -> Path:
    """Build a tiny `kind` pipeline and write it with diffusers' `save_pretrained` to `folder`; returns the path."""
    folder = Path(folder)
    build_diffusers_pipeline(kind).save_pretrained(folder, safe_serialization=True)
    return folder


def save_family_pipeline(family_name: str, folder: str | Path) -> Path:
    """A random-weight klein-style pipeline with exactly the shapes of a small named family (e.g. "demo"), saved
    with diffusers' `save_pretrained`, so `load_pipeline` must recognise the family from the configs."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from featherflux.model.config import get_family
    from featherflux.weights.autoencoder import config_to_diffusers as ae_config
    from featherflux.weights.transformer import config_to_diffusers as dit_config

    family = get_family(family_name)
    te = family.text_encoder
    if te.arch != "qwen3" or family.dit.guidance_embed:
        raise ValueError(f"{family_name} is not a klein-style family")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**strip(ae_config(family.autoencoder)))
    torch.manual_seed(1)
    transformer = Flux2Transformer2DModel(**strip(dit_config(family.dit)))
    torch.manual_seed(2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=te.vocab_size, hidden_size=te.hidden_size, intermediate_size=te.intermediate_size,
        num_hidden_layers=te.num_layers, num_attention_heads=te.num_heads, num_key_value_heads=te.num_kv_heads,
        head_dim=te.head_dim, tie_word_embeddings=te.tie_embeddings, max_position_embeddings=1024,
    ))
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                              text_encoder=text_encoder, tokenizer=qwen_tokenizer(), transformer=transformer,
                              is_distilled=family.guidance_distilled)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


_CACHE: dict[str, Path] = {}


def tiny_pipeline_dir(kind: str, scratch: str | Path) -> Path:
    """A saved tiny `kind` pipeline, built once per process under `scratch` and reused after that.

    Pass a session-scoped directory (`tmp_path_factory.mktemp("tiny")`) to share it across modules; the returned
    folder must be treated as read-only (copy it before modifying).
    """
    path = _CACHE.get(kind)
    if path is None or not path.exists():
        path = save_tiny_pipeline(kind, Path(scratch) / f"tiny-{kind}")
        _CACHE[kind] = path
    return path


def copy_pipeline(src: Path, dst: Path) -> Path:
    """A private copy of a saved pipeline folder, for tests that break or modify it."""
    shutil.copytree(src, dst)
    return dst


def load_diffusers_pipeline(path: str | Path):
    """The diffusers pipeline saved at `path`, for parity checks (diffusers is an oracle only, never used in src)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
