"""Caption upsampling for FLUX.2 [dev]: the full Mistral 3 model rewrites a prompt before it is encoded.

As BFL's reference and diffusers' `Flux2Pipeline.upsample_prompt` do it, so the same seed gives the same text:
- BFL's system message for text-to-image, or for editing when pictures come with the prompt;
- the chat template applied to a padded batch (2048 tokens), then `generate` with sampling at `temperature` and up to
  512 new tokens; only the new tokens are decoded;
- pictures of one prompt are set side by side on white, then shrunk to at most 768x768 pixels in area.
The whole model (every layer, the LM head, the vision tower) is only loaded for this and freed after; encoding
prompts keeps using the trimmed encoder. Reading pictures needs the tokenizer folder's processor, which
transformers builds only with torchvision installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from featherflux.errors import UserError, WeightsError

# BFL's system messages for FLUX.2 [dev] prompt upsampling (flux2/src/flux2/system_messages.py), kept verbatim: the
# rewritten text depends on every character.
SYSTEM_MESSAGE_T2I = (
    "You are an expert prompt engineer for FLUX.2 by Black Forest Labs. Rewrite user prompts to be more descriptive "
    "while strictly preserving their core subject and intent.\n\nGuidelines:\n1. Structure: Keep structured inputs "
    "structured (enhance within fields). Convert natural language to detailed paragraphs.\n2. Details: Add concrete "
    "visual specifics - form, scale, textures, materials, lighting (quality, direction, color), shadows, spatial "
    "relationships, and environmental context.\n3. Text in Images: Put ALL text in quotation marks, matching the "
    "prompt's language. Always provide explicit quoted text for objects that would contain text in reality (signs, "
    "labels, screens, etc.) - without it, the model generates gibberish.\n\nOutput only the revised prompt and "
    "nothing else."
)
SYSTEM_MESSAGE_I2I = (
    "You are FLUX.2 by Black Forest Labs, an image-editing expert. You convert editing requests into one concise "
    "instruction (50-80 words, ~30 for brief requests).\n\nRules:\n- Single instruction only, no commentary\n- Use "
    'clear, analytical language (avoid "whimsical," "cascading," etc.)\n- Specify what changes AND what stays the '
    "same (face, lighting, composition)\n- Reference actual image elements\n- Turn negatives into positives (\"don't "
    'change X" → "keep X")\n- Make abstractions concrete ("futuristic" → "glowing cyan neon, metallic panels")\n- '
    "Keep content PG-13\n\nOutput only the final instruction in plain text and nothing else."
)
MAX_IMAGE_AREA = 768 * 768
MAX_INPUT_TOKENS = 2048
MAX_NEW_TOKENS = 512


def load_caption_model(text_encoder_dir: str | Path, *, device, dtype: torch.dtype | None) -> nn.Module:
    """The whole Mistral 3 model of a dev `text_encoder/` folder, for generation."""
    from transformers import Mistral3ForConditionalGeneration  # transformers takes seconds to import: on first use

    try:
        model = Mistral3ForConditionalGeneration.from_pretrained(text_encoder_dir, dtype=dtype or "auto")
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot load the full text encoder in {text_encoder_dir} for upsampling: {e}") from None
    return model.eval().requires_grad_(False).to(device)


def load_chat_processor(tokenizer_dir: str | Path, tokenizer, with_images: bool):
    """The tokenizer folder's processor, which diffusers holds as dev's `tokenizer` (it turns pictures into the vision
    tower's input). Where transformers cannot build it (Pixtral's needs torchvision), text alone goes through the
    tokenizer, whose chat template is the same; pictures cannot."""
    from transformers import AutoProcessor  # transformers takes seconds to import: on first use

    try:
        return AutoProcessor.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as e:
        if with_images:
            raise UserError(
                f"upsampling with pictures needs the processor in {tokenizer_dir}, which transformers cannot build "
                f"here ({e}); install torchvision, or upsample without pictures"
            ) from None
        return tokenizer


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """Pictures in a row on white, each centred vertically (BFL's way of showing several pictures at once)."""
    if len(images) == 1:
        return images[0].copy()
    images = [im.convert("RGB") for im in images]
    row = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), (255, 255, 255))
    x = 0
    for im in images:
        row.paste(im, (x, (row.height - im.height) // 2))
        x += im.width
    return row


def _capped(image: Image.Image) -> Image.Image:
    if image.width * image.height <= MAX_IMAGE_AREA:
        return image
    scale = math.sqrt(MAX_IMAGE_AREA / (image.width * image.height))
    return image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)


def conversations(prompts: list[str], images: list[list[Image.Image]] | None) -> list[list[dict]]:
    """One chat per prompt: the system message, the prompt's pictures (if any) as a user turn, then the prompt."""
    system = SYSTEM_MESSAGE_I2I if images else SYSTEM_MESSAGE_T2I
    chats = []
    for i, prompt in enumerate(prompts):
        chat = [{"role": "system", "content": [{"type": "text", "text": system}]}]
        if images and images[i]:
            picture = _capped(side_by_side(images[i]))
            chat.append({"role": "user", "content": [{"type": "image", "image": picture}]})
        chat.append({"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]})
        chats.append(chat)
    return chats


@torch.inference_mode()
def upsample(model: nn.Module, processor, prompts: list[str], images=None, temperature: float = 0.15) -> list[str]:
    """The rewritten prompts. `images`: None, or one list of pictures per prompt."""
    if images is not None and len(images) != len(prompts):
        raise UserError(f"{len(images)} picture lists for {len(prompts)} prompts; give one list per prompt")
    inputs = processor.apply_chat_template(
        conversations(prompts, images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=MAX_INPUT_TOKENS,
    )
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}
    generated = model.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=temperature, use_cache=True
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True)
