"""Byte and FLOP accounting from the configs alone: no weights, no model construction.

Every count here is exact for the parameters (tests compare against models built on the meta device) and an
estimate for activations. Weights are split into `linear` parameters (the ones quantization replaces) and `other`
parameters (norm scales, embeddings, convolutions, biases), because quantized modes only shrink the former.

Activation estimates are deliberately a little pessimistic; they are the largest set of tensors alive at once in
the widest layer of each network at the given resolution, in the compute dtype:
- DiT: a single-stream block at 1024² holds the fused `linear1` output (3D + 2M wide), the SwiGLU output and the
  `linear2` input (D + M wide), q/k/v rotated in fp32, and a few residual-width tensors.
- autoencoder decode: the full-resolution up-sampling convolution (256 in, 128 out channels) plus GroupNorm and
  residual temporaries; attention at H/8 uses SDPA's memory-efficient kernels, so no N² matrix.
- text encoder: every hidden state is returned (the context stacks three of them), plus one MLP intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass

from featherflux.model.config import AutoEncoderConfig, DiTConfig, TextEncoderConfig

# Bytes per quantized Linear weight element, including the scales stored next to it.
QUANT_BYTES: dict[str | None, float] = {
    None: 2.0,  # bf16
    "int8": 1.0,  # + one bf16 scale per output row (added separately)
    "fp8": 1.0,  # + one fp32 scale per output row
    "nf4": 0.5 + 4 / 64,  # bitsandbytes: 4-bit codes + one fp32 absmax per 64 weights
    # GGUF block formats: bytes per block / weights per block
    "q8_0": 34 / 32,
    "q6_k": 210 / 256,
    "q5_k": 176 / 256,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "iq4_xs": 136 / 256,
    "q4_k": 144 / 256,
    "q4_0": 18 / 32,
    "q3_k": 110 / 256,
    "q2_k": 84 / 256,
}
ROW_SCALE_BYTES = {"int8": 2, "fp8": 4}


@dataclass(frozen=True)
class Weights:
    """Parameter counts of one part of a network: `linear` = elements of Linear weights, `rows` = their output rows."""

    linear: int = 0
    other: int = 0
    rows: int = 0

    def __add__(self, o: Weights) -> Weights:
        return Weights(self.linear + o.linear, self.other + o.other, self.rows + o.rows)

    def __mul__(self, n: int) -> Weights:
        return Weights(self.linear * n, self.other * n, self.rows * n)

    @property
    def params(self) -> int:
        return self.linear + self.other

    def nbytes(self, quantize: str | None = None) -> int:
        """Bytes with Linear weights stored as `quantize` and everything else in bf16."""
        if quantize not in QUANT_BYTES:
            raise ValueError(f"unknown quantization {quantize!r}; known: {', '.join(str(k) for k in QUANT_BYTES)}")
        scales = self.rows * ROW_SCALE_BYTES.get(quantize, 0)
        return int(self.linear * QUANT_BYTES[quantize]) + scales + 2 * self.other


def _linear(n_in: int, n_out: int) -> Weights:
    return Weights(linear=n_in * n_out, rows=n_out)


@dataclass(frozen=True)
class DiTWeights:
    globals: Weights  # embedders, shared modulations, final layer: always resident in streaming plans
    double_block: Weights
    single_block: Weights
    depth: int
    depth_single: int

    @property
    def total(self) -> Weights:
        return self.globals + self.double_block * self.depth + self.single_block * self.depth_single

    def block_bytes(self, quantize: str | None = None) -> list[int]:
        """Bytes of each block in execution order: the double blocks, then the single blocks."""
        return [self.double_block.nbytes(quantize)] * self.depth + [
            self.single_block.nbytes(quantize)
        ] * self.depth_single


def dit_weights(c: DiTConfig) -> DiTWeights:
    d, m = c.hidden_size, c.mlp_hidden_dim
    qk_norms = Weights(other=2 * c.head_dim)
    mlp_embedder = _linear(c.timestep_dim, d) + _linear(d, d)
    globals_ = (
        _linear(c.in_channels, d)  # img_in
        + _linear(c.context_in_dim, d)  # txt_in
        + mlp_embedder * (2 if c.guidance_embed else 1)  # time_in (+ guidance_in)
        + _linear(d, 6 * d) * 2  # double_stream_modulation_img / _txt
        + _linear(d, 3 * d)  # single_stream_modulation
        + _linear(d, 2 * d)  # final_layer.adaLN_modulation
        + _linear(d, c.in_channels)  # final_layer.linear
    )
    stream = _linear(d, 3 * d) + _linear(d, d) + qk_norms + _linear(d, 2 * m) + _linear(m, d)  # attn + SwiGLU MLP
    single = _linear(d, 3 * d + 2 * m) + _linear(d + m, d) + qk_norms
    return DiTWeights(globals_, stream * 2, single, c.depth, c.depth_single_blocks)


def dit_step_flops(c: DiTConfig, img_tokens: int, txt_tokens: int, batch: int = 1) -> float:
    """Multiply-adds x2 of one DiT forward: linears plus the two attention matmuls per block."""
    w = dit_weights(c)
    n = img_tokens + txt_tokens
    half = w.double_block.linear // 2  # img and txt streams have equal weights
    linear = half * (img_tokens + txt_tokens) * c.depth + w.single_block.linear * n * c.depth_single_blocks
    embed = w.globals.linear * 1 + c.context_in_dim * c.hidden_size * txt_tokens  # txt_in dominates the globals
    return 2.0 * batch * (linear + embed) + dit_attention_flops(c, img_tokens, txt_tokens, batch)


def dit_attention_flops(c: DiTConfig, img_tokens: int, txt_tokens: int, batch: int = 1) -> float:
    """The part of `dit_step_flops` in the attention matmuls (QK^T and PV), which stay bf16 under fp8 weights."""
    n = img_tokens + txt_tokens
    return batch * 4.0 * n * n * c.hidden_size * (c.depth + c.depth_single_blocks)


def dit_activation_bytes(c: DiTConfig, img_tokens: int, txt_tokens: int, batch: int = 1, elem: int = 2) -> int:
    d, m = c.hidden_size, c.mlp_hidden_dim
    n = img_tokens + txt_tokens
    per_token = elem * ((3 * d + 2 * m) + (d + m) + 4 * d) + 4 * 3 * d  # linear1 out, linear2 in, residuals; fp32 q/k/v
    return batch * n * per_token + batch * txt_tokens * c.context_in_dim * elem


def text_encoder_weights(c: TextEncoderConfig, layers: int | None = None) -> Weights:
    """The decoder stack up to `layers` (default: the last layer the context needs) plus the token embedding.

    The final norm and LM head are never needed for the context, so they are not counted.
    """
    layers = c.layers_needed if layers is None else layers
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = _linear(h, q) + _linear(h, kv) * 2 + _linear(q, h) + _linear(h, c.intermediate_size) * 2
    layer = layer + _linear(c.intermediate_size, h) + Weights(other=2 * h)
    if c.arch == "qwen3":
        layer = layer + Weights(other=2 * c.head_dim)  # per-head q/k RMSNorm
    return layer * layers + Weights(other=c.vocab_size * h)


def text_encoder_layer_weights(c: TextEncoderConfig) -> Weights:
    return text_encoder_weights(c, 1) + Weights(other=-c.vocab_size * c.hidden_size)


def text_encoder_flops(c: TextEncoderConfig, tokens: int, batch: int = 1) -> float:
    w = text_encoder_weights(c)
    return 2.0 * batch * tokens * w.linear + 4.0 * batch * tokens * tokens * c.num_heads * c.head_dim * c.layers_needed


def text_encoder_activation_bytes(c: TextEncoderConfig, tokens: int, batch: int = 1, elem: int = 2) -> int:
    hidden_states = (c.layers_needed + 1) * tokens * c.hidden_size
    mlp = 3 * tokens * c.intermediate_size
    attention = c.num_heads * tokens * tokens * 2  # fp32 scores where the math kernel runs
    return batch * elem * (hidden_states + mlp + attention)


def _conv(n_in: int, n_out: int, k: int) -> Weights:
    return Weights(other=n_in * n_out * k * k + n_out)


def _resnet(n_in: int, n_out: int) -> Weights:
    w = Weights(other=2 * n_in + 2 * n_out) + _conv(n_in, n_out, 3) + _conv(n_out, n_out, 3)
    return w + _conv(n_in, n_out, 1) if n_in != n_out else w


def _mid(ch: int, attention: bool) -> Weights:
    attn = Weights(other=2 * ch) + _conv(ch, ch, 1) * 4 if attention else Weights()
    return _resnet(ch, ch) * 2 + attn


def autoencoder_weights(c: AutoEncoderConfig) -> Weights:
    """Encoder + decoder + BatchNorm statistics, following BFL's autoencoder layout (all convolutions: `other`)."""
    ch = c.channels
    enc = _conv(c.in_channels, ch[0], 3)
    prev = ch[0]
    for i, out in enumerate(ch):
        for _ in range(c.num_res_blocks):
            enc, prev = enc + _resnet(prev, out), out
        if i != len(ch) - 1:
            enc = enc + _conv(out, out, 3)
    enc = enc + _mid(prev, c.mid_attention) + Weights(other=2 * prev) + _conv(prev, 2 * c.z_channels, 3)
    if c.quant_conv:
        enc = enc + _conv(2 * c.z_channels, 2 * c.z_channels, 1)
    dec = _conv(c.z_channels, ch[-1], 3) + _mid(ch[-1], c.mid_attention)
    if c.post_quant_conv:
        dec = dec + _conv(c.z_channels, c.z_channels, 1)
    prev = ch[-1]
    for i in reversed(range(len(ch))):
        for _ in range(c.num_res_blocks + 1):
            dec, prev = dec + _resnet(prev, ch[i]), ch[i]
        if i != 0:
            dec = dec + _conv(prev, prev, 3)
    dec = dec + Weights(other=2 * prev) + _conv(prev, c.out_channels, 3)
    batch_norm = Weights(other=2 * c.latent_channels + 1)  # running mean, var, num_batches_tracked
    return enc + dec + batch_norm


def autoencoder_decode_flops(c: AutoEncoderConfig, height: int, width: int) -> float:
    """Dominated by the 3x3 convolutions at the two highest resolutions."""
    flops, prev = 0.0, c.channels[-1]
    for i in reversed(range(len(c.channels))):
        pixels = height * width / 4**i
        for _ in range(c.num_res_blocks + 1):
            flops += 2 * pixels * 9 * (prev * c.channels[i] + c.channels[i] ** 2)
            prev = c.channels[i]
        if i != 0:
            flops += 2 * (pixels * 4) * 9 * prev * prev
    return flops


def autoencoder_activation_bytes(c: AutoEncoderConfig, height: int, width: int, batch: int = 1, elem: int = 2) -> int:
    widest = c.channels[1] if len(c.channels) > 1 else c.channels[0]
    return batch * height * width * elem * (widest + 3 * c.channels[0]) + batch * height * width * 4 * 2 * c.channels[0]
