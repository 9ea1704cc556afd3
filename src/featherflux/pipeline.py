"""FLUX.2 text-to-image and multi-reference editing: dev, klein (distilled and base) and klein-9b-kv.

    pipe = load_pipeline("black-forest-labs/FLUX.2-klein-4B")          # or a folder, or "demo"
    image = pipe(prompt="a red apple", image=[ref], generator=torch.Generator().manual_seed(0)).images[0]

Design choices:
- The call takes diffusers' keyword names, so code written for diffusers' Flux2 pipelines carries over; they become
  one typed `GenerationRequest` at once (`featherflux.request`: defaults, limits, the size rule).
- The pipeline holds the components and runs the phases: encode the prompt, encode the references, denoise
  (`featherflux.sampling`), decode. Memory placement moves components at the phase boundaries
  (`featherflux.memory.phase`); a device out-of-memory error moves to the next memory plan.
- Same seed, same image as diffusers: noise drawn like `randn_tensor` (see `sampling.py`), the same schedule, the
  same dtype casts (latents in the prompt-embedding dtype, DiT input in the DiT dtype, timesteps rounded through the
  latents' dtype).
- What differs between variants is data, not subclasses: `family.dit.guidance_embed` (dev's distilled guidance goes
  into the DiT), `family.guidance_distilled` (False: true CFG against the empty prompt, klein base), and
  `kv_references` (klein-9b-kv: reference tokens run once, their K/V reused at every step).
- References are appended after the noisy tokens at T = 10, 20, ...; only the noisy tokens set the schedule's mu.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from featherflux.errors import UserError
from featherflux.images import open_reference_image, overlay, postprocess
from featherflux.loading import load_components
from featherflux.lora.mixin import LoRAMixin
from featherflux.memory import needs_placement, phase, place_pipeline, retry_on_oom
from featherflux.model.attention import select as select_attention
from featherflux.model.compile import COMPILE_FAILURES, check_mode, compile_blocks, uncompile_blocks
from featherflux.model.config import FamilyConfig
from featherflux.parallel import (
    ENCODED_ON_RANK_ZERO,
    ParallelDiT,
    is_main_process,
    join_process_group,
    parallelize,
    rank_device,
)
from featherflux.parallel import check_mode as check_parallel
from featherflux.request import CACHE_METHODS, GenerationRequest, Repaint, size_multiple
from featherflux.sampling import (
    KnownRegion,
    StepCaches,
    denoise,
    denoise_kv,
    get_schedule,
    image_ids,
    initial_noise,
    pack,
    reference_ids,
    text_ids,
    unpack,
)


@dataclass
class Flux2PipelineOutput:
    images: list[Image.Image] | Tensor | np.ndarray  # PIL list, (B,3,H,W) tensor, (B,H,W,3) array or latents
    dit_calls: int = 0  # DiT passes that ran in full (fewer than the steps when step caching skipped some)


class Flux2Pipeline(LoRAMixin):
    def __init__(
        self,
        transformer,
        autoencoder,
        prompt_encoder,
        family: FamilyConfig,
        *,
        kv_references: bool = False,
        model_id: str = "",
        device: str | torch.device = "cpu",
        cache: str | None = None,
        parallel: ParallelDiT | None = None,
    ):
        self.transformer = transformer  # featherflux.model.dit.Flux2
        self.autoencoder = autoencoder  # featherflux.model.autoencoder.AutoEncoder
        self.prompt_encoder = prompt_encoder  # anything with encode(prompts, max_sequence_length) -> (B, L, ctx)
        self.family = family
        self.kv_references = kv_references
        self.model_id = model_id
        self.device = torch.device(device)  # where the denoising runs
        self.cache = cache  # the step caching of calls that do not choose their own (None or "first-block")
        self.placement = None  # a featherflux.memory.Placement, set by place_pipeline (None: all on `device`)
        self.parallel = parallel  # the DiT split across processes (featherflux.parallel), or None

    @property
    def true_cfg(self) -> bool:
        return not self.family.guidance_distilled

    def __call__(self, prompt: str | list[str] | None = None, *, return_dict: bool = True, **kwargs):
        """Generate images. The keyword names and meanings are diffusers' Flux2Pipeline / Flux2KleinPipeline ones:
        `image`, `height`, `width`, `num_inference_steps`, `sigmas`, `guidance_scale`, `num_images_per_prompt`,
        `generator` (or `seed`), `latents`, `prompt_embeds`, `negative_prompt_embeds`, `max_sequence_length`,
        `output_type`, `callback_on_step_end`, `callback_on_step_end_tensor_inputs`, `text_encoder_out_layers`,
        `caption_upsample_temperature` (dev), `show_progress` (see `GenerationRequest.from_call`). Defaults come from
        the model family. Returns an object with `.images`."""
        result = self.run(self.request(prompt, **kwargs))
        return result if return_dict else (result.images,)

    def inpaint(self, prompt: str | list[str] | None = None, *, return_dict: bool = True, **kwargs):
        """Repaint the white part of `mask_image` in `image`, with the keyword names and defaults of diffusers'
        `Flux2KleinInpaintPipeline`: `image`, `mask_image` (None: repaint everything, i.e. image-to-image),
        `image_reference` (one or more pictures to take the new content from), `strength` (0.8), `height`,
        `width`, `padding_mask_crop`, and the arguments of `__call__` (see `GenerationRequest.for_inpaint`).
        Steps and guidance default to the model family's. Works for klein (distilled and base, with CFG) and for
        dev (its guidance embedding instead of CFG). Returns an object with `.images`."""
        kwargs.setdefault("cache", self.cache)
        result = self.run(GenerationRequest.for_inpaint(self.family, prompt=prompt, **kwargs))
        return result if return_dict else (result.images,)

    def upsample_prompt(
        self, prompt: str | list[str], images: list | None = None, temperature: float = 0.15
    ) -> list[str]:
        """FLUX.2 [dev]'s caption upsampling, as diffusers' `Flux2Pipeline.upsample_prompt`: the whole Mistral 3 model
        (loaded for this call, placed like the text encoder, freed after) rewrites each prompt; with `images` (one
        picture or list of pictures per prompt) as an editing instruction. The same global torch seed gives the same
        text as diffusers."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self.family.text_encoder.arch != "mistral3":
            raise UserError(f"caption upsampling is FLUX.2 [dev]'s; {self.family.name} has no Mistral 3 to write it")
        if self.prompt_encoder is None or not hasattr(self.prompt_encoder, "upsample"):
            raise UserError(
                "caption upsampling needs the text encoder (local, or an encode server): this pipeline has none"
            )
        if images is not None:
            images = [
                [open_reference_image(i) if isinstance(i, (str, Path)) else i for i in _as_list(group)]
                for group in images
            ]
        return self.prompt_encoder.upsample(prompts, images, temperature)

    def request(self, prompt: str | list[str] | None = None, **kwargs) -> GenerationRequest:
        """The checked request of a call with these arguments, with this pipeline's family defaults filled in."""
        kwargs.setdefault("cache", self.cache)
        return GenerationRequest.from_call(self.family, prompt=prompt, **kwargs)

    def run(self, request: GenerationRequest) -> Flux2PipelineOutput:
        """Run a request; a device out-of-memory error moves to the next memory plan and runs it again."""
        return retry_on_oom(self, self._generate, request)

    def generate(self, request: GenerationRequest):
        """The images of `run(request)`."""
        return self.run(request).images

    @torch.inference_mode()  # one mode for the whole run: tensors made before the loop are like those made in it
    def _generate(self, request: GenerationRequest):
        if request.caption_upsample_temperature is not None and is_main_process():
            pictures = [list(request.pictures)] * len(request.prompts) if request.pictures else None
            prompts = self.upsample_prompt(request.prompts, pictures, request.caption_upsample_temperature)
            request = dataclasses.replace(request, prompts=prompts, caption_upsample_temperature=None)
        if self.parallel is None:
            embeds, negative = self.encode_prompt(request)
        else:  # rank 0 encodes; every rank slices the same text
            embeds, negative = self.encode_prompt(request) if is_main_process() else (None, None)
            embeds, negative = self.parallel.share(embeds), self.parallel.share(negative)
        batch = embeds.shape[0]
        repaint = request.repaint
        references = request.references if repaint is None else [repaint.image, *request.references]
        with phase(self, "autoencoder"):  # the picture to repaint is also the first reference, as in diffusers
            ref_tokens, ref_ids = self.encode_references(references, batch)
        multiple = size_multiple(self.family)
        h, w = request.height // multiple, request.width // multiple
        noise = self.prepare_latents(request, batch, h, w, embeds.dtype)
        if self.parallel is not None:  # every rank starts from rank 0's noise, so all of them make the same image
            noise = self.parallel.broadcast(noise)
        known = None if repaint is None else self.known_region(repaint, ref_tokens[:, : h * w], noise, h, w)
        caches = StepCaches(request.cache_threshold)
        with phase(self, "dit"):
            try:
                latents = self.denoise(request, noise, h, w, embeds, negative, ref_tokens, ref_ids, known, caches)
            except COMPILE_FAILURES as err:  # raised on the first call of a compiled block, before any step ended
                warnings.warn(f"the compiled DiT failed to build ({type(err).__name__}); running eagerly", stacklevel=2)
                uncompile_blocks(self.transformer)
                caches = StepCaches(request.cache_threshold)
                latents = self.denoise(request, noise, h, w, embeds, negative, ref_tokens, ref_ids, known, caches)
        with phase(self, "autoencoder"):
            images = self.decode(latents, h, w, request.output_type)
        if repaint is not None and repaint.overlay is not None:
            o = repaint.overlay
            images = [overlay(o.original, o.mask, image, o.box) for image in images]
        return Flux2PipelineOutput(images, caches.dit_calls)

    def encode_prompt(self, request: GenerationRequest) -> tuple[Tensor, Tensor | None]:
        """(B * num_images_per_prompt, L, ctx) prompt embeddings, and the negative ones when true CFG runs."""
        n = request.num_images_per_prompt
        if request.prompt_embeds is not None:
            embeds = request.prompt_embeds.to(self.device)
        else:
            embeds = self._encode(request.prompts, request)
        negative = None
        if self.true_cfg and request.guidance > 1:
            negative = request.negative_prompt_embeds
            if negative is None:
                negative = self._encode([""] * embeds.shape[0], request)
            negative = negative.to(self.device).repeat_interleave(n, dim=0)
        return embeds.repeat_interleave(n, dim=0), negative

    def _encode(self, prompts: list[str], request: GenerationRequest) -> Tensor:
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

    def prepare_latents(self, request: GenerationRequest, batch: int, h: int, w: int, dtype: torch.dtype) -> Tensor:
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

    def known_region(self, repaint: Repaint, picture: Tensor, noise: Tensor, h: int, w: int) -> KnownRegion:
        """The inpainting state of the loop: the picture's tokens (B, h*w, C), the noise, and the mask shrunk to the
        token grid (bilinear, as diffusers does) and packed to (B, h*w, 1)."""
        mask = F.interpolate(repaint.mask, size=(h, w), mode="bilinear").to(self.device, noise.dtype)
        return KnownRegion(picture.to(noise.dtype), noise, pack(mask.repeat(noise.shape[0], 1, 1, 1)))

    @torch.inference_mode()
    def denoise(
        self,
        request: GenerationRequest,
        latents: Tensor,
        h: int,
        w: int,
        embeds: Tensor,
        negative: Tensor | None,
        ref_tokens: Tensor | None,
        ref_ids: Tensor | None,
        known: KnownRegion | None = None,
        caches: StepCaches | None = None,
    ) -> Tensor:
        """Noise (B, h*w, C) -> clean packed latents, by `sampling.denoise` (or `denoise_kv` for klein-9b-kv).
        Inpainting skips the noisiest steps by strength and starts from the picture noised to the first that runs
        (`latents=` given by the caller are taken as that start, as diffusers does)."""
        sigmas = get_schedule(request.num_steps, latents.shape[1], request.sigmas).to(self.device)
        if known is not None:
            sigmas = sigmas[request.repaint.first_step(request.num_steps) :]
            if request.latents is None:
                latents = known.noised(sigmas[0])
        x_ids = image_ids(h, w).to(self.device)
        ctx_ids = text_ids(embeds.shape[1]).to(self.device)
        on_step = None if request.callback is None else self._step_callback(request)
        dit = self.transformer if self.parallel is None else self.parallel
        if self.kv_references and ref_tokens is not None:
            if request.cache_threshold > 0:
                raise UserError("step caching does not combine with klein-9b-kv's reference K/V cache; drop `cache`")
            return denoise_kv(
                dit,
                latents,
                sigmas,
                x_ids=x_ids,
                ctx=embeds,
                ctx_ids=ctx_ids,
                ref_tokens=ref_tokens,
                ref_ids=ref_ids,
                known=known,
                on_step=on_step,
                progress=request.show_progress,
                caches=caches,
            )
        guidance = None
        if self.family.dit.guidance_embed:
            guidance = torch.full((latents.shape[0],), request.guidance, dtype=torch.float32, device=self.device)
        return denoise(
            dit,
            latents,
            sigmas,
            x_ids=x_ids,
            ctx=embeds,
            ctx_ids=ctx_ids,
            guidance=guidance,
            ref_tokens=ref_tokens,
            ref_ids=ref_ids,
            negative_ctx=negative,
            cfg_scale=request.guidance,
            known=known,
            on_step=on_step,
            progress=request.show_progress,
            caches=caches,
        )

    def _step_callback(self, request: GenerationRequest):
        """diffusers' `callback_on_step_end(pipe, step, timestep, tensors)` as a `sampling.StepCallback`."""

        def on_step(step: int, timestep: Tensor, latents: Tensor, embeds: Tensor) -> tuple[Tensor, Tensor]:
            tensors = {"latents": latents, "prompt_embeds": embeds}
            changed = request.callback(self, step, timestep, {k: tensors[k] for k in request.callback_inputs})
            if not changed:
                return latents, embeds
            return changed.get("latents", latents), changed.get("prompt_embeds", embeds)

        return on_step

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


def _as_list(group) -> list:
    return list(group) if isinstance(group, (list, tuple)) else [group]


def load_pipeline(
    path_or_repo_id: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prompt_encoder=None,
    text_encoder_out_layers: tuple[int, ...] | None = None,
    vram: str | int | None = None,
    ram: str | int | None = None,
    offload: str | None = None,
    quantize: str | None = None,
    embed_cache: str | Path | None = None,
    text_encoder: str | None = None,
    text_encoder_token: str | None = None,
    transformer: str | Path | None = None,
    mmap: bool | None = None,
    download: bool = False,
    revision: str | None = None,
    attention: str = "auto",
    cache: str | None = None,
    compile: bool | str = False,
    parallel: str | None = None,
    parallel_degree: int | None = None,
) -> Flux2Pipeline:
    """Load a FLUX.2 pipeline from a diffusers-layout folder (with model_index.json), a hub repo id already in the
    local Hugging Face cache, or "demo" (the small model shipped with featherflux).

    `dtype=None` keeps each checkpoint's dtype. `prompt_encoder` replaces the local text encoder (e.g. a remote
    one); then `text_encoder/` is not read. `text_encoder_out_layers` overrides the family's stacked layers (for
    custom checkpoints whose encoder is shallower than the family's).

    Memory (`featherflux.memory`): on CUDA, or when `vram`, `offload` or `quantize` is given, the weights are loaded
    on the host and placed by the planner: `vram`/`ram` budgets ("24GiB"; detected when None), `offload` None
    (planner's choice) | "model" | "blocks" | "sequential", `quantize` None (planner's choice: the checkpoint's
    precision whenever the DiT fits on the device) | "none" (never quantize) | "int8" | "fp8" | "nf4".
    `embed_cache` is a folder of cached prompt embeddings.

    `transformer=FILE` takes the DiT from a single file instead of `transformer/`: a ComfyUI-GGUF `.gguf`, a BFL fp8
    `.safetensors` or a plain BFL checkpoint, of the folder's architecture. `mmap=True` leaves the DiT's weights
    memory-mapped from the file (for hosts with little RAM); None = when the memory plan says so.

    `text_encoder="http://host:port"` encodes prompts on a `featherflux encode-server` (`featherflux.text_encoder`)
    instead of loading `text_encoder/`; `text_encoder_token` is its bearer token ($FEATHERFLUX_TEXT_ENCODER_TOKEN if
    None).

    A hub repo id is looked up in the local Hugging Face cache; `download=True` fetches what is missing of the files
    this run needs (at `revision`), through huggingface_hub (`featherflux.loading.hub`).

    `attention` is the DiT's attention kernel, chosen here once (`featherflux.model.attention`): "auto" (the
    fastest this device and dtype can run) | "sdpa" | "cudnn" | "flash" | "flash3" | "sage". `cache="first-block"`
    turns on step caching for every call that does not choose its own (`GenerationRequest`). `compile=True`
    compiles the DiT's repeated blocks (`featherflux.model.compile`; the first call of each size pays for it),
    "max" also autotunes and, on CUDA, replays them as CUDA graphs; where the compiler cannot run, a warning and
    eager mode.

    `parallel` splits one image across the processes that `torchrun` started (`featherflux.parallel`): "ulysses"
    (heads exchanged by all-to-all; the head count must divide by the process count), "ring" (K/V passed around a
    ring; any count), "usp" (both; `parallel_degree` is its Ulysses degree), "cfg" (true CFG's two passes on two
    processes) or "cfg+ulysses" / "cfg+ring" / "cfg+usp". Each process computes on `cuda:LOCAL_RANK` (or the CPU,
    on gloo), and every one returns the same images.
    """
    select_attention(attention, device, dtype or torch.bfloat16)  # fail before any weights are read
    compile = check_mode(compile)
    check_parallel(parallel)
    if parallel is not None:
        device = rank_device(device)
        join_process_group(parallel, str(device))
        if not is_main_process() and prompt_encoder is None and text_encoder is None:
            prompt_encoder = ENCODED_ON_RANK_ZERO  # rank 0 encodes and broadcasts: one text encoder per run
        if "tensor" in parallel.split("+") and mmap is None:
            mmap = True  # each rank reads only the pages of its slices of the weights
    if cache is not None and cache not in CACHE_METHODS:
        raise UserError(f"unknown cache method {cache!r}; use one of {', '.join(CACHE_METHODS)} (or None)")
    parts = load_components(
        path_or_repo_id,
        device=device,
        dtype=dtype,
        prompt_encoder=prompt_encoder,
        text_encoder_out_layers=text_encoder_out_layers,
        vram=vram,
        ram=ram,
        offload=offload,
        quantize=quantize,
        text_encoder=text_encoder,
        text_encoder_token=text_encoder_token,
        transformer=transformer,
        mmap=mmap,
        download=download,
        revision=revision,
    )
    compute_dtype = next((p.dtype for p in parts.transformer.parameters() if p.is_floating_point()), dtype)
    parts.transformer.set_attention(select_attention(attention, device, compute_dtype or torch.bfloat16))
    if compile:  # before placement: weight streaming then wraps the compiled blocks
        compile_blocks(parts.transformer, compile, device)
    split = None if parallel is None else parallelize(parts.transformer, parallel, parallel_degree, device)
    pipe = Flux2Pipeline(
        parts.transformer,
        parts.autoencoder,
        parts.prompt_encoder,
        parts.family,
        kv_references=parts.variant == "klein-kv",
        model_id=parts.model_id,
        device=device,
        cache=cache,
        parallel=split,
    )
    if needs_placement(device, vram=vram, offload=offload, quantize=quantize) or embed_cache is not None:
        place_pipeline(
            pipe,
            device,
            vram=vram,
            ram=ram,
            offload=offload,
            quantize=quantize,
            embed_cache=embed_cache,
            mmap=parts.mmap,
            tensor_parallel=1 if split is None else split.mesh.tensor,
        )
    return pipe
