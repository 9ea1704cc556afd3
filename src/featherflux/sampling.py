"""FLUX.2 sampling: the timestep schedule, position ids, latent packing, the initial noise and the denoising loops.

Design choices:
- The schedule is a plain tensor of N+1 sigmas (last one 0); there is no scheduler object with state.
- Numerics follow diffusers' FlowMatchEulerDiscreteScheduler as FLUX.2 pipelines drive it, so the same seed gives the
  same image: sigmas `linspace(1, 1/N, N)` rounded to fp32, the exponential shift by the empirical, resolution
  dependent mu computed in fp32, and Euler updates done in fp32 and cast back to the velocity's dtype.
- Position ids are (T, H, W, L) per token. Text runs along L; the generated image sits at T=0; reference image i
  (0-based) at T=10*(i+1). Ids are identical across the batch, so builders return (N, 4) and callers expand.
- The loops (`denoise`, and `denoise_kv` for klein-9b-kv) are plain functions over tensors and a DiT, as in BFL's
  reference; the pipeline only prepares their inputs. They never read a value back from the device.
- Noise is drawn like diffusers' `randn_tensor`: on the generator's device (CPU), directly in the requested dtype,
  in the patchified (B, C, H/16, W/16) layout; a list of generators draws one sample per generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from featherflux.model.dit import FirstBlockCache

REFERENCE_TIME_STEP = 10  # T offset between reference images (10, 20, 30, ...)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's fitted log-shift mu for a resolution (image tokens only, references excluded) and step count."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def get_schedule(num_steps: int, image_seq_len: int, sigmas: list[float] | None = None) -> Tensor:
    """fp32 sigmas (num_steps + 1,) from 1 towards 0, shifted for `image_seq_len` image tokens; the last is 0.

    `sigmas` replaces the unshifted `linspace(1, 1/N, N)` (diffusers' `sigmas=`); mu still uses `num_steps`, as in
    diffusers. Timesteps fed to the DiT are `sigmas[:-1] * 1000` (then cast to the latents' dtype, as diffusers does).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mu = compute_empirical_mu(image_seq_len, num_steps)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    sigmas = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
    # exp(mu) / (exp(mu) + (1/s - 1)); python floats stay "weak", so this is fp32 arithmetic like diffusers'
    sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])


def euler_step(x: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x_next = x + (sigma_next - sigma) * v, accumulated in fp32 and returned in the velocity's dtype."""
    return (x.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


# position ids


def image_ids(height: int, width: int, t: int = 0) -> Tensor:
    """(height*width, 4) ids (t, row, col, 0) for a packed latent grid in row-major order."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)


def text_ids(length: int) -> Tensor:
    """(length, 4) ids (0, 0, 0, l): text tokens are laid out along the L axis."""
    zeros = torch.zeros(length, dtype=torch.long)
    return torch.stack([zeros, zeros, zeros, torch.arange(length)], dim=-1)


def reference_ids(grids: list[tuple[int, int]]) -> Tensor:
    """(sum h*w, 4) ids for reference latent grids [(h, w), ...], reference i at T = 10 * (i + 1)."""
    if not grids:
        return torch.zeros(0, 4, dtype=torch.long)
    return torch.cat([image_ids(h, w, t=REFERENCE_TIME_STEP * (i + 1)) for i, (h, w) in enumerate(grids)])


# latent layout


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C) tokens, row-major."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, h*w, C) row-major tokens -> (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None, dtype: torch.dtype
) -> Tensor:
    """Gaussian noise of `shape` (B, C, h, w) drawn exactly as diffusers' `randn_tensor` draws it on CPU."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images; pass one per image")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


# the denoising loops


@dataclass(frozen=True)
class KnownRegion:
    """Inpainting: the tokens outside the mask are the picture's, noised to the current noise level (diffusers'
    `scale_noise`), so only the masked region is generated. All (B, N, C) packed tokens; `mask` is (B, N, 1)."""

    image: Tensor  # the picture's clean, normalised latents
    noise: Tensor  # the noise the run started from
    mask: Tensor  # 1 = repaint, 0 = keep; fractional at the mask's edges (bilinear downsampling)

    def noised(self, sigma: Tensor) -> Tensor:
        sigma = sigma.to(self.image.dtype)
        return sigma * self.noise + (1.0 - sigma) * self.image

    def blend(self, latents: Tensor, sigma: Tensor) -> Tensor:
        """After a step to noise level `sigma`: the generated tokens inside the mask, the picture's outside."""
        return (1 - self.mask) * self.noised(sigma) + self.mask * latents

# Called after every step with (step, timestep x 1000, latents, prompt embeddings); returns the (possibly
# replaced) latents and embeddings, as diffusers' `callback_on_step_end` may.
StepCallback = Callable[[int, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _timestep(sigma: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    # diffusers rounds the timestep through the latents' dtype before dividing by 1000
    return (sigma * 1000).expand(batch).to(dtype) / 1000


def _steps(sigmas: Tensor, progress: bool):
    return tqdm(range(len(sigmas) - 1), desc="denoising", disable=not progress, leave=False)


@dataclass
class StepCaches:
    """First-block caches for one run (`featherflux.model.dit.FirstBlockCache`): one for the conditional passes, one
    for the unconditional ones when true CFG runs them apart. `dit_calls` counts the DiT passes that ran in full."""

    threshold: float = 0.0

    def __post_init__(self):
        self.cond = FirstBlockCache(self.threshold)
        self.uncond = FirstBlockCache(self.threshold)

    @property
    def dit_calls(self) -> int:
        return self.cond.full_passes + self.uncond.full_passes


class _Context:
    """The prompt side of a DiT call, in the DiT's dtype. With true CFG and prompts of one length, `paired` holds
    [prompt; negative] embeddings and ids, so both passes run as one batch."""

    def __init__(self, ctx: Tensor, ids: Tensor, negative: Tensor | None, negative_ids: Tensor | None):
        self.ctx = ctx
        self.paired = None
        if negative is not None and negative.shape == ctx.shape:
            self.paired = (torch.cat([ctx, negative]), torch.cat([ids, negative_ids]))


def denoise(
    dit: nn.Module,
    latents: Tensor,
    sigmas: Tensor,
    *,
    x_ids: Tensor,
    ctx: Tensor,
    ctx_ids: Tensor,
    guidance: Tensor | None = None,
    ref_tokens: Tensor | None = None,
    ref_ids: Tensor | None = None,
    negative_ctx: Tensor | None = None,
    cfg_scale: float = 1.0,
    known: KnownRegion | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
    caches: StepCaches | None = None,
) -> Tensor:
    """Euler steps from noise to clean packed latents (B, N, C), in the latents' dtype.

    x_ids (N, 4), ctx (B, L, ctx_dim), ctx_ids (L, 4); `guidance` (B,) goes into the DiT's guidance embedding (dev).
    Reference tokens (B, R, C) with ids (R, 4) are appended after the noisy ones and only the noisy tokens' velocity
    is kept. With `negative_ctx`, true classifier-free guidance: v = v_neg + cfg_scale * (v - v_neg), both passes
    in one DiT call of batch 2B when the two prompts have the same length (they do when padded). With
    `known` (inpainting), the region outside the mask is put back after every step. `caches` skips the DiT's
    later blocks on steps whose first block changed little (threshold 0: never) and counts the passes.
    """
    caches = caches or StepCaches()
    dtype = next(dit.parameters()).dtype
    batch, num_img = latents.shape[:2]
    # every id tensor and cast is made once, on the device, before the loop: nothing is copied from the host per step
    ids = (x_ids if ref_ids is None else torch.cat([x_ids, ref_ids]))[None].expand(batch, -1, -1)
    ctx_ids = ctx_ids[None].expand(batch, -1, -1)
    ref_tokens = None if ref_tokens is None else ref_tokens.to(dtype)
    negative_ids = None
    if negative_ctx is not None:
        negative_ctx = negative_ctx.to(dtype)
        negative_ids = text_ids(negative_ctx.shape[1]).to(latents.device)[None].expand(batch, -1, -1)
    context = _Context(ctx.to(dtype), ctx_ids, negative_ctx, negative_ids)
    paired_ids = None if negative_ctx is None else torch.cat([ids, ids])  # only true CFG needs the doubled ids
    for i in _steps(sigmas, progress):
        t = _timestep(sigmas[i], batch, latents.dtype)
        x = latents.to(dtype)
        if ref_tokens is not None:
            x = torch.cat([x, ref_tokens], dim=1)
        if context.paired is not None:
            both_ctx, both_ids = context.paired
            both = dit(torch.cat([x, x]), paired_ids, torch.cat([t, t]), both_ctx, both_ids, None, caches.cond)
            v, v_neg = both[:, :num_img].chunk(2)
            v = v_neg + cfg_scale * (v - v_neg)
        else:
            v = dit(x, ids, t, context.ctx, ctx_ids, guidance, caches.cond)[:, :num_img]
            if negative_ctx is not None:
                v_neg = dit(x, ids, t, negative_ctx, negative_ids, None, caches.uncond)[:, :num_img]
                v = v_neg + cfg_scale * (v - v_neg)
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if known is not None:
            latents = known.blend(latents, sigmas[i + 1])
        if on_step is not None:
            latents, new_ctx = on_step(i, sigmas[i] * 1000, latents, ctx)
            if new_ctx is not ctx:
                ctx = new_ctx
                context = _Context(ctx.to(dtype), ctx_ids, negative_ctx, negative_ids)
    return latents


def denoise_kv(
    dit: nn.Module,
    latents: Tensor,
    sigmas: Tensor,
    *,
    x_ids: Tensor,
    ctx: Tensor,
    ctx_ids: Tensor,
    ref_tokens: Tensor,
    ref_ids: Tensor,
    known: KnownRegion | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
    caches: StepCaches | None = None,
) -> Tensor:
    """`denoise` for klein-9b-kv: the first step runs [reference, noisy] tokens and keeps every block's reference
    K/V; later steps run the noisy tokens only, with the cached K/V joining every attention."""
    dtype = next(dit.parameters()).dtype
    batch = latents.shape[0]
    kv_cache = None
    for i in _steps(sigmas, progress):
        t = _timestep(sigmas[i], batch, latents.dtype)
        x = latents.to(dtype)
        if kv_cache is None:
            x = torch.cat([ref_tokens.to(dtype), x], dim=1)
            ids = torch.cat([ref_ids, x_ids])[None].expand(batch, -1, -1)
            v, kv_cache = dit.forward_kv_extract(x, ids, t, ctx.to(dtype), ctx_ids[None], ref_tokens.shape[1])
        else:
            v = dit.forward_kv_cached(x, x_ids[None], t, ctx.to(dtype), ctx_ids[None], kv_cache)
        if caches is not None:
            caches.cond.full_passes += 1  # no step caching on this path: every pass is a full one
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if known is not None:
            latents = known.blend(latents, sigmas[i + 1])
        if on_step is not None:
            latents, ctx = on_step(i, sigmas[i] * 1000, latents, ctx)
    return latents
