"""Model configs: one frozen dataclass per network, one `FamilyConfig` per model family.

This file is the single source of truth for the shape of every model featherflux knows. Make variants with
`dataclasses.replace`; never mutate a preset.

Names follow BFL's flux2 code (`hidden_size`, `depth`, `depth_single_blocks`, `context_in_dim`), which is also
our native parameter layout. Diffusers' config names are translated in `featherflux.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DiTConfig:
    """The FLUX.2 diffusion transformer (BFL's `Flux2Params`)."""

    in_channels: int = 128  # packed latent channels: 4 x autoencoder z_channels
    context_in_dim: int = 15360  # text-encoder width x number of stacked hidden layers
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per position axis (t, h, w, l)
    theta: int = 2000
    guidance_embed: bool = True  # dev has a distilled-guidance embedding; klein does not
    timestep_dim: int = 256  # sinusoidal embedding width for timestep and guidance

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal head_dim={self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class AutoEncoderConfig:
    """The FLUX.2 autoencoder: a KL autoencoder with 2x2 patchify and BatchNorm latent statistics."""

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per resolution level; len-1 downsamplings
    num_res_blocks: int = 2  # per level in the encoder (decoder uses num_res_blocks + 1)
    z_channels: int = 32
    norm_groups: int = 32
    quant_conv: bool = True  # 1x1 conv after the encoder
    post_quant_conv: bool = True  # 1x1 conv before the decoder
    mid_attention: bool = True
    bn_eps: float = 1e-4
    bn_momentum: float = 0.1
    patch_size: int = 2  # latents are patchified 2x2 before the DiT sees them
    # Tiled encode/decode works on tiles of this many pixels (diffusers' `sample_size`). Not architecture: it is left
    # out of comparisons, so a folder that sets it still matches its family.
    sample_size: int = field(default=1024, compare=False, repr=False)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified, normalised latents that the DiT consumes."""
        return self.z_channels * self.patch_size**2


@dataclass(frozen=True)
class TextEncoderConfig:
    """The transformers text encoder and how its hidden states become the DiT's context."""

    arch: str  # "mistral3" (dev) or "qwen3" (klein, demo)
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    out_layers: tuple[int, ...]  # hidden_states indices stacked into the context (0 = embeddings)
    max_length: int = 512
    tie_embeddings: bool = False

    @property
    def context_dim(self) -> int:
        return self.hidden_size * len(self.out_layers)

    @property
    def layers_needed(self) -> int:
        """Decoder layers that must run; the ones past the last stacked layer are dead weight."""
        return max(self.out_layers)


@dataclass(frozen=True)
class FamilyConfig:
    """Everything that makes a model family: the three networks and the sampling defaults."""

    name: str
    dit: DiTConfig
    autoencoder: AutoEncoderConfig
    text_encoder: TextEncoderConfig
    default_steps: int
    default_guidance: float
    guidance_distilled: bool  # True: guidance goes into the DiT embedding or is fixed; False: true CFG
    default_size: int = 1024  # output width and height when neither a size nor a reference image gives one

    def __post_init__(self):
        if self.dit.in_channels != self.autoencoder.latent_channels:
            raise ValueError(f"{self.name}: DiT in_channels must equal the autoencoder's patchified channels")
        if self.dit.context_in_dim != self.text_encoder.context_dim:
            raise ValueError(f"{self.name}: DiT context_in_dim must equal the text encoder's stacked width")


FLUX2_AUTOENCODER = AutoEncoderConfig()

MISTRAL_SMALL_3 = TextEncoderConfig(
    arch="mistral3",
    hidden_size=5120,
    num_layers=40,
    intermediate_size=32768,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=131072,
    out_layers=(10, 20, 30),
)

QWEN3_4B = TextEncoderConfig(
    arch="qwen3",
    hidden_size=2560,
    num_layers=36,
    intermediate_size=9728,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151936,
    out_layers=(9, 18, 27),
    tie_embeddings=True,
)

QWEN3_8B = TextEncoderConfig(
    arch="qwen3",
    hidden_size=4096,
    num_layers=36,
    intermediate_size=12288,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151936,
    out_layers=(9, 18, 27),
)

FAMILIES: dict[str, FamilyConfig] = {
    "flux.2-dev": FamilyConfig(
        name="flux.2-dev",
        dit=DiTConfig(),
        autoencoder=FLUX2_AUTOENCODER,
        text_encoder=MISTRAL_SMALL_3,
        default_steps=50,
        default_guidance=4.0,
        guidance_distilled=True,
    ),
    "klein-4b": FamilyConfig(
        name="klein-4b",
        dit=DiTConfig(
            context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, guidance_embed=False
        ),
        autoencoder=FLUX2_AUTOENCODER,
        text_encoder=QWEN3_4B,
        default_steps=4,
        default_guidance=1.0,
        guidance_distilled=True,
    ),
    "klein-9b": FamilyConfig(
        name="klein-9b",
        dit=DiTConfig(
            context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, guidance_embed=False
        ),
        autoencoder=FLUX2_AUTOENCODER,
        text_encoder=QWEN3_8B,
        default_steps=4,
        default_guidance=1.0,
        guidance_distilled=True,
    ),
    # FLUX.2 scaled down to 64x64 pictures of flat shapes (featherflux.demo): trained here in minutes on CPU,
    # klein-base-style (no guidance embedding; true CFG against the empty prompt). Ships inside the package.
    "demo": FamilyConfig(
        name="demo",
        dit=DiTConfig(
            in_channels=64,
            context_in_dim=192,
            hidden_size=128,
            num_heads=4,
            depth=2,
            depth_single_blocks=2,
            axes_dim=(8, 8, 8, 8),
            guidance_embed=False,
        ),
        autoencoder=AutoEncoderConfig(channels=(16, 32, 32), num_res_blocks=1, z_channels=16, norm_groups=1),
        text_encoder=TextEncoderConfig(
            arch="qwen3",
            hidden_size=64,
            num_layers=3,
            intermediate_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            vocab_size=384,
            out_layers=(1, 2, 3),
            max_length=16,
            tie_embeddings=True,
        ),
        default_steps=4,
        default_guidance=2.0,
        guidance_distilled=False,
        default_size=64,
    ),
}


def get_family(name: str) -> FamilyConfig:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}") from None
