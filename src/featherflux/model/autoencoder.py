"""The FLUX.2 autoencoder: a KL autoencoder (8x down, 32 latent channels) plus BatchNorm latent statistics.

Design choices:
- Parameter names are BFL's `ae.safetensors` names (`encoder.down.0.block.1.conv1`, `encoder.mid.attn_1.q`,
  `encoder.quant_conv`, `decoder.up.3.upsample.conv`, `bn.running_mean`), so BFL's file loads without renaming.
  Diffusers' names are translated in `featherflux.weights.autoencoder`.
- `encode` returns the posterior mode (the mean half of the moments); FLUX.2 never samples the posterior.
- `normalize` / `denormalize` own the 2x2 patchify and the BatchNorm running-statistics normalisation that
  diffusers does inside its pipeline, so callers never reach into `bn`. `bn` is only a container for the running
  statistics; its forward is never called (so train/eval mode does not matter).
- Numerics follow diffusers' `AutoencoderKLFlux2`: GroupNorm eps 1e-6, one-head mid attention via SDPA,
  nearest 2x upsampling, and downsampling by a stride-2 conv after padding right and bottom by one.
- Inputs are cast to the autoencoder's dtype; outputs come back in that dtype.
- Tiling and slicing are diffusers' switches with diffusers' tiles: `enable_tiling()` encodes and decodes images
  larger than `config.sample_size` pixels in overlapping tiles (a quarter overlap, blended linearly, the same
  order and rounding), so a tiled decode here equals diffusers' tiled decode; `enable_slicing()` runs a batch one
  image at a time, which changes nothing but memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featherflux.errors import UserError
from featherflux.model.config import AutoEncoderConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A 1x1 projection only where the width changes, as in the checkpoint.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels.

    q/k/v/proj_out are 1x1 convs as in BFL's checkpoint, but run as matmuls over (B, HW, C) tokens: one GEMM
    each, and the same kernels (so the same rounding) as diffusers' Linear layers.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        # (B, 1, HW, C): one head spanning all channels
        q, k, v = (F.linear(h, conv.weight.view(C, C), conv.bias).unsqueeze(1) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = F.linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only) keeps the reference's pixel alignment; Conv2d cannot express it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Level(nn.Module):
    """One resolution level (`down.N` / `up.N` in the checkpoint): resnet blocks, then an optional resampler."""

    def __init__(
        self, blocks: list[ResnetBlock], downsample: Downsample | None = None, upsample: Upsample | None = None
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample


class Encoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        ch, groups = config.channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch[0]
        for i, block_out in enumerate(ch):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            last = i == len(ch) - 1
            self.down.append(Level(blocks, downsample=None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in, groups, config.mid_attention)
        self.norm_out = group_norm(block_in, groups)
        # Moments: mean and log-variance of the posterior, z_channels each.
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, kernel_size=3, padding=1)
        z2 = 2 * config.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, kernel_size=1) if config.quant_conv else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h


class Decoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        ch, groups, z = config.channels, config.norm_groups, config.z_channels
        self.post_quant_conv = nn.Conv2d(z, z, kernel_size=1) if config.post_quant_conv else None
        block_in = ch[-1]
        self.conv_in = nn.Conv2d(z, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, groups, config.mid_attention)
        # `up[i]` works at the resolution of `down[i]`; it runs from the deepest level up, so build it reversed.
        levels = []
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch[i], groups))
                block_in = ch[i]
            levels.append(Level(blocks, upsample=Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Holds running_mean / running_var (and num_batches_tracked, which BFL's file carries) for `normalize`.
        self.bn = nn.BatchNorm2d(config.latent_channels, eps=config.bn_eps, momentum=config.bn_momentum, affine=False)
        self.use_tiling = False
        self.use_slicing = False
        self.tile_size = config.sample_size  # pixels; the latent tile is tile_size / downsample_factor

    def enable_tiling(self, tile_size: int | None = None) -> None:
        """Encode and decode images larger than `tile_size` pixels (default `config.sample_size`, 1024 for FLUX.2)
        tile by tile, so memory is that of one tile. Seams are blended, but a tiled image differs slightly from an
        untiled one, as in diffusers."""
        size = self.config.sample_size if tile_size is None else tile_size
        step = 4 * self.config.downsample_factor  # a quarter-overlap stride must stay on the latent grid
        if isinstance(size, bool) or not isinstance(size, int) or size < step or size % step:
            raise UserError(f"tile_size must be a multiple of {step} pixels (at least {step}); got {size!r}")
        self.tile_size = size
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time: the same images, the memory of one."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, z_channels, H/8, W/8) posterior mode."""
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise UserError(
                f"autoencoder.encode expects images of shape (B, {self.config.in_channels}, H, W) with H and W "
                f"multiples of {f}; got {tuple(images.shape)}. Resize or crop the image first."
            )
        moments = self._per_image(self._encode, images.to(self.dtype))
        return moments[:, : self.config.z_channels]

    def _encode(self, images: Tensor) -> Tensor:
        tile, f = self.tile_size, self.config.downsample_factor
        if self.use_tiling and max(images.shape[-2:]) > tile:
            return tiled(self.encoder, images, tile=tile, out_tile=tile // f)
        return self.encoder(images)

    def decode(self, z: Tensor) -> Tensor:
        """(B, z_channels, h, w) latents -> (B, 3, 8h, 8w) images, nominally in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise UserError(
                f"autoencoder.decode expects latents of shape (B, {self.config.z_channels}, h, w); "
                f"got {tuple(z.shape)}. Call denormalize() first on patchified DiT latents."
            )
        return self._per_image(self._decode, z.to(self.dtype))

    def _decode(self, z: Tensor) -> Tensor:
        tile, f = self.tile_size, self.config.downsample_factor
        if self.use_tiling and max(z.shape[-2:]) > tile // f:
            return tiled(self.decoder, z, tile=tile // f, out_tile=tile)
        return self.decoder(z)

    def _per_image(self, fn, x: Tensor) -> Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(one) for one in x.split(1)])
        return fn(x)

    def normalize(self, z: Tensor) -> Tensor:
        """(B, z, h, w) -> (B, 4z, h/2, w/2): 2x2 patchify, then (x - running_mean) / sqrt(running_var + eps)."""
        B, C, H, W = z.shape
        p = self.config.patch_size
        if C != self.config.z_channels or H % p or W % p:
            raise UserError(
                f"autoencoder.normalize expects latents (B, {self.config.z_channels}, h, w) with h and w multiples "
                f"of {p}; got {tuple(z.shape)}."
            )
        # channel index c*p*p + dy*p + dx, as BFL's "c (i pi) (j pj) -> (c pi pj) i j"
        x = z.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, H // p, W // p)
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, latents: Tensor) -> Tensor:
        """Exact inverse of `normalize`: (B, 4z, h, w) -> (B, z, 2h, 2w)."""
        B, C, H, W = latents.shape
        p = self.config.patch_size
        if C != self.config.latent_channels:
            raise UserError(
                f"autoencoder.denormalize expects latents (B, {self.config.latent_channels}, h, w); "
                f"got {tuple(latents.shape)}."
            )
        mean, std = self._stats(latents)
        x = latents * std + mean
        return x.reshape(B, C // (p * p), p, p, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // (p * p), H * p, W * p)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # std is formed in the statistics' own dtype and then cast, as diffusers' pipeline does.
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.bn_eps).to(like.device, like.dtype)
        return mean, std


def tiled(fn, x: Tensor, *, tile: int, out_tile: int) -> Tensor:
    """`fn` over overlapping `tile`-sized squares of `x` (a quarter overlap), each output tile (`out_tile` square)
    blended linearly into the one above and the one to its left, in diffusers' order, then the overlaps cropped."""
    stride = int(tile * 0.75)
    blend = int(out_tile * 0.25)
    rows = [
        [fn(x[:, :, i : i + tile, j : j + tile]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i:
                _blend_into(rows[i - 1][j], out, blend, dim=2)
            if j:
                _blend_into(row[j - 1], out, blend, dim=3)
    keep = out_tile - blend
    return torch.cat([torch.cat([out[:, :, :keep, :keep] for out in row], dim=3) for row in rows], dim=2)


def _blend_into(before: Tensor, after: Tensor, extent: int, dim: int) -> None:
    """Fade the last `extent` rows (dim=2) or columns (dim=3) of `before` into the first ones of `after`, in place."""
    extent = min(before.shape[dim], after.shape[dim], extent)
    if extent == 0:
        return
    # weights in float64 then rounded once, and each product rounded to the tensor's dtype before the sum: the same
    # rounding as diffusers' per-row `a * (1 - y / extent) + b * (y / extent)` with Python floats
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float64) / extent).view(shape).to(after.device)
    head = after.narrow(dim, 0, extent)
    tail = before.narrow(dim, before.shape[dim] - extent, extent)
    faded = (tail.float() * (1 - w).float()).to(after.dtype) + (head.float() * w.float()).to(after.dtype)
    head.copy_(faded)
