"""FLUX.2 text-to-image and multi-reference editing: dev, klein (distilled and base) and klein-9b-kv.

    pipe = load_pipeline("black-forest-labs/FLUX.2-klein-4B")          # or a folder, or "demo"
    image = pipe(prompt="a red apple", image=[ref], generator=torch.Generator().manual_seed(0)).images[0]

Design choices:
- The call takes diffusers' keyword names, so code written for diffusers' Flux2 pipelines carries over; it is turned
  into a small typed `Request` at once, and the phases (encode prompt, encode references, denoise, decode) are
  separate methods over plain tensors.
- Same seed, same image as diffusers: noise drawn like `randn_tensor` (see `sampling.py`), the same schedule, the
  same dtype casts (latents in the prompt-embedding dtype, DiT input in the DiT dtype, timesteps rounded through the
  latents' dtype).
- What differs between variants is data, not subclasses: `family.dit.guidance_embed` (dev's distilled guidance goes
  into the DiT), `family.guidance_distilled` (False: true CFG against the empty prompt, klein base), and
  `kv_references` (klein-9b-kv: reference tokens run once, their K/V reused at every step).
- References are appended after the noisy tokens at T = 10, 20, ...; only the noisy tokens set the schedule's mu.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from featherflux.errors import UserError
from featherflux.images import open_reference_image, postprocess, reference_tensor
from featherflux.loading import load_components
from featherflux.memory import needs_placement, phase, place_pipeline, retry_on_oom
from featherflux.model.config import FamilyConfig
from featherflux.sampling import (
    euler_step,
    get_schedule,
    image_ids,
    initial_noise,
    pack,
    reference_ids,
    text_ids,
    unpack,
)

MAX_REFERENCES = 10
MIN_SIDE = 64
MAX_PIXELS = 4 * 1024 * 1024
DEFAULT_SIZES = {"demo": 64}  # output side when neither a size nor a reference is given; 1024 otherwise
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """The size floored to `multiple` (16 for every FLUX.2 family: 8x autoencoder, 2x2 patches); a UserError when
    that is out of range. The CLI calls it too, so a bad size fails before minutes of loading."""
    h, w = height // multiple * multiple, width // multiple * multiple
    if min(h, w) < MIN_SIDE or h * w > MAX_PIXELS:
        raise UserError(
            f"size {width}x{height} is out of range: each side must be >= {MIN_SIDE} px and the image at most "
            f"{MAX_PIXELS // 2**20} megapixels ({MAX_PIXELS} pixels)"
        )
    return h, w


@dataclass
class Flux2PipelineOutput:
    images: list[Image.Image] | Tensor | object  # PIL list, (B,3,H,W) tensor, (B,H,W,3) array or latents


@dataclass
class Request:
    """One validated pipeline call. `prompts` is None when `prompt_embeds` are given."""

    prompts: list[str] | None
    prompt_embeds: Tensor | None
    negative_prompt_embeds: Tensor | None
    references: list[Tensor]  # (1, 3, h, w) each, in [-1, 1]
    height: int
    width: int
    num_steps: int
    sigmas: list[float] | None  # custom unshifted sigmas (diffusers' `sigmas=`); their count sets the steps
    guidance: float
    num_images_per_prompt: int
    generator: torch.Generator | list[torch.Generator] | None
    latents: Tensor | None
    max_sequence_length: int
    out_layers: tuple[int, ...] | None
    output_type: str
    callback: Callable | None
    callback_inputs: tuple[str, ...]
    show_progress: bool


class Flux2Pipeline:
    def __init__(self, transformer, autoencoder, prompt_encoder, family: FamilyConfig, *, kv_references: bool = False,
                 model_id: str = "", device: str | torch.device = "cpu"):
        self.transformer = transformer  # featherflux.model.dit.Flux2
        self.autoencoder = autoencoder  # featherflux.model.autoencoder.AutoEncoder
        self.prompt_encoder = prompt_encoder  # anything with encode(prompts, max_sequence_length) -> (B, L, ctx)
        self.family = family
        self.kv_references = kv_references
        self.model_id = model_id
        self.device = torch.device(device)  # where the denoising runs
        self.placement = None  # MEM: featherflux.memory.Placement set by place_pipeline (None: all on `device`)

    @property
    def true_cfg(self) -> bool:
        return not self.family.guidance_distilled

    # LORA: adapters on the transformer; the logic lives in featherflux.lora, these only delegate

    def load_lora(self, path, name: str | None = None, scale: float = 1.0) -> str:
        """Add a LoRA/LoKr file (diffusers, BFL/ComfyUI, kohya or LyCORIS keys); returns its name."""
        from featherflux.lora import load_lora

        return load_lora(self.transformer, path, name=name, scale=scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        from featherflux.lora import set_lora_scale

        set_lora_scale(self.transformer, name, scale)

    def set_loras(self, wanted: dict) -> None:
        """Make exactly `wanted` = {name: (path, scale)} active; other loaded adapters stay cached at scale 0."""
        from featherflux.lora import set_loras

        set_loras(self.transformer, wanted)

    def fuse_lora(self) -> None:
        from featherflux.lora import fuse_lora

        fuse_lora(self.transformer)

    def unfuse_lora(self) -> None:
        from featherflux.lora import unfuse_lora

        unfuse_lora(self.transformer)

    def unload_lora(self, name: str | None = None) -> None:
        from featherflux.lora import unload_lora

        unload_lora(self.transformer, name)

    # end LORA

    # the public call

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Image.Image | str | Path | list | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        text_encoder_out_layers: tuple[int, ...] | None = None,
        show_progress: bool = True,
    ):
        """Generate images; keyword names and meanings follow diffusers' Flux2Pipeline / Flux2KleinPipeline.

        `seed` is a shortcut for `generator=torch.Generator("cpu").manual_seed(seed)`. Defaults (steps, guidance,
        size, sequence length) come from the model family. Returns an object with `.images`.
        """
        request = self._request(
            prompt, image, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, generator, seed,
            latents, prompt_embeds, negative_prompt_embeds, max_sequence_length, output_type, callback_on_step_end,
            callback_on_step_end_tensor_inputs, text_encoder_out_layers, show_progress, sigmas=sigmas,
        )
        images = self.generate(request)
        return Flux2PipelineOutput(images) if return_dict else (images,)

    def _request(self, prompt, image, height, width, steps, guidance, per_prompt, generator, seed, latents,
                 prompt_embeds, negative_prompt_embeds, max_sequence_length, output_type, callback, callback_inputs,
                 out_layers, show_progress, sigmas=None) -> Request:
        if (prompt is None) == (prompt_embeds is None):
            raise UserError("pass exactly one of `prompt` and `prompt_embeds`")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if prompts is not None and not prompts:
            raise UserError("`prompt` is an empty list; pass at least one prompt")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        if per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {per_prompt}")
        if generator is not None and seed is not None:
            raise UserError("pass `generator` or `seed`, not both")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        unknown = set(callback_inputs) - {"latents", "prompt_embeds"}
        if unknown:
            raise UserError(f"callback_on_step_end_tensor_inputs may name latents and prompt_embeds, not {unknown}")
        references = self._references(image)
        if height is None or width is None:
            ref_h, ref_w = references[0].shape[-2:] if references else (None, None)
            default = DEFAULT_SIZES.get(self.family.name, 1024)
            height = height if height is not None else ref_h or default  # 0 is a bad size, not "default"
            width = width if width is not None else ref_w or default
        height, width = self._check_size(int(height), int(width))
        steps = self.family.default_steps if steps is None else steps
        if steps < 1:
            raise UserError(f"num_inference_steps must be >= 1, got {steps}")
        if sigmas is not None and (len(sigmas) < 1 or not all(0 < s <= 1 for s in sigmas)):
            raise UserError("sigmas must be a non-empty list of values in (0, 1], e.g. numpy.linspace(1, 1/N, N)")
        return Request(
            prompts=prompts,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            references=references,
            height=height,
            width=width,
            num_steps=int(steps),
            sigmas=None if sigmas is None else [float(s) for s in sigmas],
            guidance=float(self.family.default_guidance if guidance is None else guidance),
            num_images_per_prompt=per_prompt,
            generator=generator,
            latents=latents,
            max_sequence_length=max_sequence_length or self.family.text_encoder.max_length,
            out_layers=tuple(out_layers) if out_layers else None,
            output_type=output_type,
            callback=callback,
            callback_inputs=tuple(callback_inputs),
            show_progress=show_progress,
        )

    @property
    def _multiple(self) -> int:
        return self.family.autoencoder.downsample_factor * self.family.autoencoder.patch_size

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        floored = check_size(height, width, self._multiple)
        if floored != (height, width):
            warnings.warn(f"size {width}x{height} is not a multiple of {self._multiple}; using "
                          f"{floored[1]}x{floored[0]}", stacklevel=4)
        return floored

    def _references(self, image) -> list[Tensor]:
        if image is None:
            return []
        images = image if isinstance(image, (list, tuple)) else [image]
        if len(images) > MAX_REFERENCES:
            raise UserError(f"{len(images)} reference images given; at most {MAX_REFERENCES} are supported")
        out = []
        for i, img in enumerate(images):
            name = str(img) if isinstance(img, (str, Path)) else f"#{i + 1}"
            if isinstance(img, (str, Path)):
                img = open_reference_image(img)
            if not isinstance(img, Image.Image):
                raise UserError(f"reference image {name} is a {type(img).__name__}; pass PIL images or file paths")
            out.append(reference_tensor(img, name, self._multiple))
        return out

    # phases

    def generate(self, request: Request):
        return retry_on_oom(self, self._generate, request)  # MEM: a device OOM moves to the next memory plan

    def _generate(self, request: Request):
        embeds, negative = self.encode_prompt(request)
        batch = embeds.shape[0]
        with phase(self, "autoencoder"):  # MEM: phase boundaries move offloaded components
            ref_tokens, ref_ids = self.encode_references(request.references, batch)
        h, w = request.height // self._multiple, request.width // self._multiple
        noise = self.prepare_latents(request, batch, h, w, embeds.dtype)
        with phase(self, "dit"):
            latents = self.denoise(request, noise, h, w, embeds, negative, ref_tokens, ref_ids)
        with phase(self, "autoencoder"):
            return self.decode(latents, h, w, request.output_type)

    def encode_prompt(self, request: Request) -> tuple[Tensor, Tensor | None]:
        """(B * num_images_per_prompt, L, ctx) prompt embeddings, and the negative ones when true CFG runs."""
        n = request.num_images_per_prompt
        if request.prompt_embeds is not None:
            embeds = request.prompt_embeds.to(self.device)
        else:
            embeds = self._encode(request.prompts, request)
        cfg = self.true_cfg and request.guidance > 1
        negative = None
        if cfg:
            negative = request.negative_prompt_embeds
            if negative is None:
                negative = self._encode([""] * embeds.shape[0], request)
            negative = negative.to(self.device).repeat_interleave(n, dim=0)
        return embeds.repeat_interleave(n, dim=0), negative

    def _encode(self, prompts: list[str], request: Request) -> Tensor:
        if self.prompt_encoder is None:
            raise UserError(
                "this pipeline has no text encoder; pass prompt_embeds (and negative_prompt_embeds for true CFG)"
            )
        if request.out_layers is not None:
            out = self.prompt_encoder.encode(prompts, request.max_sequence_length, out_layers=request.out_layers)
        else:
            out = self.prompt_encoder.encode(prompts, request.max_sequence_length)
        return out.to(self.device)

    @torch.inference_mode()
    def encode_references(self, references: list[Tensor], batch: int) -> tuple[Tensor | None, Tensor | None]:
        """Reference images -> normalised packed tokens (batch, R, C) in the autoencoder's dtype, and their ids."""
        if not references:
            return None, None
        device = next(self.autoencoder.parameters()).device
        tokens, grids = [], []
        for ref in references:
            latent = self.autoencoder.normalize(self.autoencoder.encode(ref.to(device, self.autoencoder.dtype)))
            grids.append(tuple(latent.shape[-2:]))
            tokens.append(pack(latent))
        tokens = torch.cat(tokens, dim=1).to(self.device).repeat(batch, 1, 1)
        return tokens, reference_ids(grids).to(self.device)

    def prepare_latents(self, request: Request, batch: int, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """The initial noise as packed tokens (B, h*w, C), drawn exactly as diffusers draws it."""
        shape = (batch, self.family.dit.in_channels, h, w)
        if request.latents is not None:
            if tuple(request.latents.shape) != shape:
                got = tuple(request.latents.shape)
                raise UserError(f"latents must have shape {shape} (B, C, H/16, W/16); got {got}")
            noise = request.latents
        else:
            if isinstance(request.generator, list) and len(request.generator) != batch:
                raise UserError(f"{len(request.generator)} generators given for {batch} images; pass one per image")
            noise = initial_noise(shape, request.generator, dtype)
        return pack(noise.to(self.device, dtype))

    @torch.inference_mode()
    def denoise(self, request: Request, latents: Tensor, h: int, w: int, embeds: Tensor, negative: Tensor | None,
                ref_tokens: Tensor | None, ref_ids: Tensor | None) -> Tensor:
        """Euler steps from noise to clean packed latents (B, h*w, C), in the latents' dtype."""
        dit = self.transformer
        dit_dtype = next(dit.parameters()).dtype
        batch, num_img = latents.shape[:2]
        sigmas = get_schedule(request.num_steps, num_img, request.sigmas).to(self.device)
        x_ids = image_ids(h, w).to(self.device)
        all_ids = x_ids if ref_ids is None else torch.cat([x_ids, ref_ids])
        ctx_ids = text_ids(embeds.shape[1]).to(self.device)
        guidance = None
        if self.family.dit.guidance_embed:
            guidance = torch.full((batch,), request.guidance, dtype=torch.float32, device=self.device)
        kv_cache = None
        steps = tqdm(range(len(sigmas) - 1), desc="denoising", disable=not request.show_progress, leave=False)
        for i in steps:
            # diffusers rounds the timestep through the latents' dtype before dividing by 1000
            t = (sigmas[i] * 1000).expand(batch).to(latents.dtype) / 1000
            x = latents.to(dit_dtype)
            ctx = embeds.to(dit_dtype)
            if self.kv_references and ref_tokens is not None:
                if kv_cache is None:
                    x = torch.cat([ref_tokens.to(dit_dtype), x], dim=1)
                    ids = torch.cat([ref_ids, x_ids])[None].expand(batch, -1, -1)
                    v, kv_cache = dit.forward_kv_extract(x, ids, t, ctx, ctx_ids[None], ref_tokens.shape[1])
                else:
                    v = dit.forward_kv_cached(x, x_ids[None], t, ctx, ctx_ids[None], kv_cache)
            else:
                if ref_tokens is not None:
                    x = torch.cat([x, ref_tokens.to(dit_dtype)], dim=1)
                ids = all_ids[None].expand(batch, -1, -1)
                v = dit(x, ids, t, ctx, ctx_ids[None].expand(batch, -1, -1), guidance)[:, :num_img]
                if negative is not None:
                    v_neg = dit(x, ids, t, negative.to(dit_dtype), text_ids(negative.shape[1]).to(self.device)[None],
                                None)[:, :num_img]
                    v = v_neg + request.guidance * (v - v_neg)
            latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
            if request.callback is not None:
                tensors = {"latents": latents, "prompt_embeds": embeds}
                changed = request.callback(self, i, sigmas[i] * 1000, {k: tensors[k] for k in request.callback_inputs})
                if changed:
                    latents = changed.get("latents", latents)
                    embeds = changed.get("prompt_embeds", embeds)
        return latents

    @torch.inference_mode()
    def decode(self, latents: Tensor, h: int, w: int, output_type: str):
        """Packed latents -> images; "latent" returns dev's packed tokens, or klein's denormalised (B, z, H/8, W/8)."""
        if output_type == "latent" and self.family.dit.guidance_embed:
            return latents  # dev returns the packed, normalised tokens, as diffusers' Flux2Pipeline does
        z = self.autoencoder.denormalize(unpack(latents, h, w))
        if output_type == "latent":
            return z
        device = next(self.autoencoder.parameters()).device
        return postprocess(self.autoencoder.decode(z.to(device)), output_type)


def load_pipeline(path_or_repo_id: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  prompt_encoder=None, text_encoder_out_layers: tuple[int, ...] | None = None,
                  vram: str | int | None = None, ram: str | int | None = None, offload: str | None = None,
                  quantize: str | None = None, embed_cache: str | Path | None = None,
                  text_encoder: str | None = None, text_encoder_token: str | None = None,
                  transformer: str | Path | None = None, mmap: bool | None = None) -> Flux2Pipeline:
    """Load a FLUX.2 pipeline from a diffusers-layout folder (with model_index.json), a hub repo id already in the
    local Hugging Face cache, or "demo" (the small model shipped with featherflux).

    `dtype=None` keeps each checkpoint's dtype. `prompt_encoder` replaces the local text encoder (e.g. a remote
    one); then `text_encoder/` is not read. `text_encoder_out_layers` overrides the family's stacked layers (for
    custom checkpoints whose encoder is shallower than the family's).

    Memory (featherflux.memory): on CUDA, or when `vram`, `offload` or `quantize` is given, the weights are loaded
    on the host and placed by the planner: `vram`/`ram` budgets ("24GiB"; detected when None), `offload` None
    (planner's choice) | "model" | "blocks" | "sequential", `quantize` None (planner's choice) | "int8" | "fp8" |
    "nf4". `embed_cache` is a folder of cached prompt embeddings.

    `transformer=FILE` (MEM) takes the DiT from a single file instead of `transformer/`: a ComfyUI-GGUF `.gguf`,
    a BFL fp8 `.safetensors` or a plain BFL checkpoint, of the folder's architecture. `mmap=True` leaves the DiT's
    weights memory-mapped from the file (for hosts with little RAM); None = when the memory plan says so.

    `text_encoder="http://host:port"` encodes prompts on a `featherflux encode-server` (featherflux.serve) instead
    of loading `text_encoder/`; `text_encoder_token` is its bearer token ($FEATHERFLUX_TEXT_ENCODER_TOKEN if None).
    """
    parts = load_components(
        path_or_repo_id, device=device, dtype=dtype, prompt_encoder=prompt_encoder,
        text_encoder_out_layers=text_encoder_out_layers, vram=vram, ram=ram, offload=offload, quantize=quantize,
        text_encoder=text_encoder, text_encoder_token=text_encoder_token, transformer=transformer, mmap=mmap,
    )
    pipe = Flux2Pipeline(parts.transformer, parts.autoencoder, parts.prompt_encoder, parts.family,
                         kv_references=parts.variant == "klein-kv", model_id=parts.model_id, device=device)
    if needs_placement(device, vram=vram, offload=offload, quantize=quantize) or embed_cache is not None:
        place_pipeline(pipe, device, vram=vram, ram=ram, offload=offload, quantize=quantize, embed_cache=embed_cache,
                       mmap=parts.mmap)
    return pipe
