"""The demo text encoder's tokenizer: a byte-level BPE over the caption vocabulary, wrapped like Qwen3's.

It is a `Qwen2TokenizerFast` with Qwen's special tokens and a chat template, so the klein prompt-encoding code path
(chat template, padding to `max_sequence_length`, stacked hidden states) runs unchanged on the demo. The BPE is trained
until every caption word is one token; captions then tokenize to a fixed layout (same word, same position).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

from featherflux.demo import scenes

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Only the message text and an end marker: every text token costs DiT compute on each step, and the demo has no
# roles or thinking to mark. `apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)` works.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
MAX_VOCAB = 384  # the text encoder's embedding rows; the trained BPE is smaller


def corpus() -> list[str]:
    """Every caption the demo knows, the novel colour included (so a LoRA can teach it)."""
    captions = [s.caption for s in scenes.all_scenes(tuple(scenes.COLORS))]
    return captions


def build_tokenizer() -> Qwen2TokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
