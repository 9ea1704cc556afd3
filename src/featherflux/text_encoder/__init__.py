"""Prompt encoding: a local transformers model (`local`), or an `featherflux encode-server` over HTTP (`remote`).

Both have the same interface: `encode(prompts, max_sequence_length) -> (B, L, context)`, `model_id` and `family`.
Embeddings travel between the two as a safetensors body (`wire`), never pickled.
"""

from featherflux.text_encoder.local import PromptEncoder, load_prompt_encoder, text_config_from_folder
from featherflux.text_encoder.remote import RemoteEncoderError, RemotePromptEncoder, connect_text_encoder

__all__ = [
    "PromptEncoder",
    "RemoteEncoderError",
    "RemotePromptEncoder",
    "connect_text_encoder",
    "load_prompt_encoder",
    "text_config_from_folder",
]
