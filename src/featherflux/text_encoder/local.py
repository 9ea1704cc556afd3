"""Prompt encoding: a transformers language model whose stacked hidden states become the DiT's context.

Design choices:
- Only the decoder layers up to the last stacked one are built, loaded and run (dev: 30 of Mistral's 40 layers;
  klein: 27 of Qwen3's 36). The vision tower, the LM head and the dead layers are never read from disk.
- transformers puts the post-final-norm state in the last `hidden_states` slot. When the model is cut short, that
  slot must hold the raw output of the last kept layer, as it does in the full model, so the final norm is dropped;
  when the last stacked layer is the model's last layer, the norm stays and the result matches the full model.
- Prompts are formatted like diffusers' FLUX.2 pipelines (dev: BFL's system message in the Mistral chat format;
  klein: the Qwen3 chat template with thinking off), padded to `max_sequence_length`, and encoded with the attention
  mask. The DiT later sees all padded tokens without a mask, as in the reference.
- The real dev `tokenizer/` folder is a PixtralProcessor (which needs torchvision); only its tokenizer is loaded.

Anything with `encode(prompts, max_sequence_length) -> (B, L, context_dim)`, `model_id` and `family` can stand in
for `PromptEncoder` in a pipeline (for example a remote encoder client).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from featherflux.errors import UserError, WeightsError
from featherflux.text_encoder.upsample import load_caption_model, load_chat_processor, upsample

# BFL's system message for FLUX.2 [dev] prompt encoding (note the embedded newline).
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

# Checkpoint key prefixes of the language model inside Mistral3ForConditionalGeneration (old and new layouts).
_MISTRAL3_TEXT_KEYS = {r"^(?:model\.)?language_model\.(?:model\.)?": ""}


class PromptEncoder:
    """Turns prompts into FLUX.2 context: hidden states of `out_layers` stacked per token, (B, L, len * hidden)."""

    def __init__(self, model: nn.Module, tokenizer, *, arch: str, out_layers: tuple[int, ...], model_id: str,
                 family: str, folders: tuple[Path, Path] | None = None):
        self.model = model  # a transformers MistralModel / Qwen3Model holding only the layers that are used
        self.tokenizer = tokenizer
        self.arch = arch
        self.out_layers = tuple(out_layers)
        self.model_id = model_id
        self.family = family
        self.folders = folders  # (text_encoder/, tokenizer/): where caption upsampling loads the whole model from

    def upsample(self, prompts: list[str], images=None, temperature: float = 0.15, carry=None) -> list[str]:
        """FLUX.2 [dev]'s caption upsampling (`text_encoder.upsample`): the whole Mistral 3 model, loaded for this
        call and freed after, rewrites each prompt. `images`: None or one list of pictures per prompt. `carry(model,
        layers)` places the model as the memory plan places the text encoder; without it, on this encoder's device.
        Loading leaves the global RNG untouched, so the same seed gives the same text as diffusers."""
        if self.arch != "mistral3":
            raise UserError(
                f"caption upsampling is FLUX.2 [dev]'s (its Mistral 3 model writes the text); {self.family} encodes "
                "prompts with Qwen3"
            )
        if self.folders is None:
            raise UserError("this prompt encoder does not know its folders; load it with load_prompt_encoder")
        with torch.random.fork_rng(devices=[]):
            model = load_caption_model(self.folders[0], device="cpu" if carry else self.device, dtype=self.dtype)
        processor = load_chat_processor(self.folders[1], self.tokenizer, with_images=bool(images))
        try:
            with carry(model, model.model.language_model.layers) if carry else contextlib.nullcontext():
                return upsample(model, processor, list(prompts), images, temperature)
        finally:
            del model

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def to(self, device: str | torch.device) -> PromptEncoder:
        self.model.to(device)
        return self

    def format(self, prompts: list[str]) -> list[str]:
        """The chat-formatted text of each prompt, exactly as the FLUX.2 pipelines build it."""
        if self.arch == "mistral3":
            return [_mistral_chat(self.tokenizer, p.replace("[IMG]", "")) for p in prompts]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> dict[str, Tensor]:
        texts = self.format(prompts)
        # The Mistral chat text already carries <s>; the Qwen tokenizer adds nothing.
        special = self.arch != "mistral3"
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]
        for prompt, n in zip(prompts, lengths):
            if n > max_sequence_length:
                warnings.warn(
                    f"prompt is {n} tokens with its chat template, over the limit of {max_sequence_length}; "
                    f"truncated: {prompt[:60]!r}...",
                    stacklevel=3,
                )
        return self.tokenizer(
            texts,
            add_special_tokens=special,
            padding="max_length",
            truncation=True,
            max_length=max_sequence_length,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int = 512,
               out_layers: tuple[int, ...] | None = None) -> Tensor:
        out_layers = tuple(out_layers or self.out_layers)
        kept = len(self.model.layers)
        if max(out_layers) > kept or min(out_layers) < 0:
            raise ValueError(
                f"text encoder layers {out_layers} requested, but {self.model_id} was loaded with {kept} decoder "
                f"layers; load the pipeline with text_encoder_out_layers={out_layers}"
            )
        inputs = self.tokenize(list(prompts), max_sequence_length)
        out = self.model(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = torch.stack([out.hidden_states[k] for k in out_layers], dim=2)  # (B, L, n, hidden)
        return hidden.flatten(2).to(self.dtype)


def _mistral_chat(tokenizer, prompt: str) -> str:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
    ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    # The Mistral Small 3.x format, for tokenizer folders that ship the template with the processor only.
    return f"{tokenizer.bos_token}[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{prompt}[/INST]"


def text_config_from_folder(folder: Path):
    """The transformers config of the language model in a diffusers `text_encoder/` folder, and its arch."""
    from transformers import AutoConfig  # transformers takes seconds to import: on first use

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the text encoder config in {folder}: {e}") from None
    if config.model_type == "mistral3":
        return config.text_config, "mistral3"
    if config.model_type == "qwen3":
        return config, "qwen3"
    raise WeightsError(
        f"{folder}: text encoder model_type {config.model_type!r} is not a FLUX.2 encoder (mistral3 or qwen3)"
    )


def load_tokenizer(folder: Path):
    """The tokenizer class the folder names (as diffusers gets it); a processor folder that needs packages we do
    not have (Pixtral wants torchvision) falls back to the plain fast tokenizer in tokenizer.json."""
    from transformers import (  # transformers takes seconds to import: on first use
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, ImportError) as e:
        if not (folder / "tokenizer.json").exists():
            raise WeightsError(f"cannot load the tokenizer in {folder}: {e}") from None
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None) and (folder / "chat_template.json").exists():
        tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging  # transformers takes seconds to import: on first use

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def load_prompt_encoder(
    text_encoder_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    out_layers: tuple[int, ...],
    family: str,
    model_id: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> PromptEncoder:
    """Load the language model of a diffusers `text_encoder/` folder, cut after the last of `out_layers`."""
    from transformers import MistralModel, Qwen3Model  # transformers takes seconds to import: on first use

    text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
    config, arch = text_config_from_folder(text_encoder_dir)
    total = config.num_hidden_layers
    if max(out_layers) > total:
        raise WeightsError(
            f"{text_encoder_dir}: the text encoder has {total} layers but layers {tuple(out_layers)} are requested; "
            f"pass text_encoder_out_layers with indices <= {total}"
        )
    config.num_hidden_layers = max(out_layers)
    model_cls = MistralModel if arch == "mistral3" else Qwen3Model
    kwargs = dict(config=config, dtype=dtype or "auto", output_loading_info=True)
    if arch == "mistral3":
        kwargs["key_mapping"] = _MISTRAL3_TEXT_KEYS
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(text_encoder_dir, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot load the text encoder in {text_encoder_dir}: {e}") from None
    missing = [k for k in info["missing_keys"] if not (k == "norm.weight" and config.num_hidden_layers < total)]
    if missing or info["mismatched_keys"]:
        raise WeightsError(
            f"{text_encoder_dir}: text encoder weights do not fit its config; missing {missing[:5]}, "
            f"mis-shaped {[k for k, *_ in info['mismatched_keys']][:5]}"
        )
    if config.num_hidden_layers < total:
        model.norm = nn.Identity()  # the full model's slot k < num_layers is the raw layer output
    model.eval().requires_grad_(False).to(device)
    return PromptEncoder(
        model, load_tokenizer(tokenizer_dir), arch=arch, out_layers=tuple(out_layers), model_id=model_id,
        family=family, folders=(text_encoder_dir, tokenizer_dir),
    )
