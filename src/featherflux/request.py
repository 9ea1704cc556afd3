"""One generation request, resolved the same way by the pipeline call, the CLI, the HTTP API and batch jobs.

Every default and limit of a request lives here, so changing one changes it everywhere:
- defaults per family: steps, guidance and the output side come from the `FamilyConfig`; a size not given is the
  first reference's, else the family's default side. A pipeline that names no family (a stand-in, such as a test
  double) gets FLUX.2 [dev]'s defaults.
- the size rule: sides are floored to the family's token size (16 px for FLUX.2: an 8x autoencoder and 2x2
  patches), as diffusers does, and the floored size must have sides of at least 64 px and at most 4 megapixels.
- limits: at most 10 reference images, at least one step, known output types.
- the PNG metadata keys (`ImageParameters`): an image made by any entry point can be re-made by any other.

`GenerationRequest.from_call` takes diffusers' keyword names (those of `Flux2Pipeline.__call__` /
`Flux2KleinPipeline.__call__`) and returns the small typed request the pipeline runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from featherflux.errors import UserError
from featherflux.images import (
    crop_region,
    inpaint_image_tensor,
    inpaint_size,
    mask_tensor,
    open_reference_image,
    reference_tensor,
)
from featherflux.model.config import FAMILIES, FamilyConfig

MAX_REFERENCES = 10
MIN_SIDE = 64
MAX_PIXELS = 4 * 1024 * 1024
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("latents", "prompt_embeds")
CACHE_METHODS = ("first-block",)  # step caching (`featherflux.model.dit.FirstBlockCache`)
# relative change of the first block's residual below which a step reuses the last full pass; see the README's
# "Step caching" for how it was chosen
DEFAULT_CACHE_THRESHOLD = 0.12


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance: float
    side: int  # output width and height when neither a size nor a reference gives one


def defaults(family: FamilyConfig | None) -> Defaults:
    family = family or FAMILIES["flux.2-dev"]
    return Defaults(family.default_steps, family.default_guidance, family.default_size)


def size_multiple(family: FamilyConfig | None) -> int:
    """Pixels per DiT token along a side: every output and reference side is a multiple of it."""
    if family is None:
        return 16
    return family.autoencoder.downsample_factor * family.autoencoder.patch_size


def floor_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) floored to `multiple`, or a UserError when the result is out of range."""
    h, w = height // multiple * multiple, width // multiple * multiple
    if min(h, w) < MIN_SIDE or h * w > MAX_PIXELS:
        raise UserError(
            f"size {width}x{height} is out of range: each side must be >= {MIN_SIDE} px and the image at most "
            f"{MAX_PIXELS // 2**20} megapixels ({MAX_PIXELS} pixels)"
        )
    return h, w


def check_references(count: int) -> None:
    if count > MAX_REFERENCES:
        raise UserError(f"{count} reference images given; at most {MAX_REFERENCES} are supported")


def check_steps(steps: int) -> None:
    if steps < 1:
        raise UserError(f"num_inference_steps must be >= 1, got {steps}")


@dataclass(frozen=True)
class ImageParameters:
    """What re-makes one image; stored as its PNG text chunks (`featherflux.images.save_png`)."""

    prompt: str
    model: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    references: tuple[str, ...] = ()  # file or upload names
    loras: tuple[str, ...] = ()  # "file_or_name:scale"
    init: str | None = None  # inpainting: the picture repainted, its mask (None: all of it), and the strength
    mask: str | None = None
    strength: float | None = None
    upsampled_prompt: str | None = None  # dev's caption upsampling: what the text encoder actually encoded

    def as_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "model": self.model,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "references": list(self.references),
            "loras": list(self.loras),
            "init": self.init,
            "mask": self.mask,
            "strength": self.strength,
            "upsampled_prompt": self.upsampled_prompt,
            "software": "featherflux",
        }


@dataclass(frozen=True)
class Overlay:
    """`padding_mask_crop`: the repainted crop goes back into the original picture, where the mask is white."""

    original: Image.Image
    mask: Image.Image  # at the original's size
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the crop in the original


@dataclass(frozen=True)
class Repaint:
    """What inpainting adds to a request: the picture to start from, and where to repaint it."""

    image: Tensor  # (1, 3, H, W) in [-1, 1] at the output size
    mask: Tensor  # (1, 1, H, W): 1 = repaint, 0 = keep
    strength: float  # 1: from pure noise; less: from the picture noised to that level, fewer steps
    overlay: Overlay | None

    def first_step(self, num_steps: int) -> int:
        """The index of the first of `num_steps` schedule steps that runs (diffusers' `get_timesteps`)."""
        return int(max(num_steps - min(num_steps * self.strength, num_steps), 0))


@dataclass(frozen=True)
class GenerationRequest:
    """One validated pipeline call. `prompts` is None when `prompt_embeds` are given."""

    prompts: list[str] | None
    prompt_embeds: Tensor | None
    negative_prompt_embeds: Tensor | None
    references: list[Tensor]  # (1, 3, h, w) each, in [-1, 1], preprocessed as diffusers does
    height: int
    width: int
    num_steps: int
    sigmas: list[float] | None  # custom unshifted sigmas (diffusers' `sigmas=`)
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
    repaint: Repaint | None = None  # inpainting (`Flux2Pipeline.inpaint`)
    caption_upsample_temperature: float | None = (
        None  # dev: rewrite the prompts first (`Flux2Pipeline.upsample_prompt`)
    )
    pictures: tuple[Image.Image, ...] = ()  # the reference pictures as given: what the caption upsampler looks at
    cache_threshold: float = 0.0  # first-block step caching; 0: every step runs the whole DiT

    @classmethod
    def from_call(
        cls,
        family: FamilyConfig,
        *,
        prompt: str | list[str] | None = None,
        image: Image.Image | str | Path | list | None = None,
        height: int | None = None,
        width: int | None = None,
        **call,
    ) -> GenerationRequest:
        """The request of a generation call with diffusers' keyword names, checked, with the family's defaults.

        `image` is one reference (a PIL image or a file path) or a list of them; the other arguments are those of
        `_resolve`. A size that is not a multiple of the family's token size is floored, with a warning."""
        multiple = size_multiple(family)
        references, pictures = _references(image, multiple)
        side = defaults(family).side
        if height is None or width is None:
            ref_h, ref_w = references[0].shape[-2:] if references else (None, None)
            height = height if height is not None else ref_h or side  # 0 is a bad size, not "default"
            width = width if width is not None else ref_w or side
        height, width = _floored(int(height), int(width), multiple)
        return cls._resolve(
            family, prompt=prompt, references=references, pictures=pictures, height=height, width=width, **call
        )

    @classmethod
    def for_inpaint(
        cls,
        family: FamilyConfig,
        *,
        image: Image.Image | str | Path | None = None,
        mask_image: Image.Image | str | Path | None = None,
        image_reference: Image.Image | str | Path | list | None = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        prompt: str | list[str] | None = None,
        **call,
    ) -> GenerationRequest:
        """The request of an inpainting call with the keyword names of diffusers' `Flux2KleinInpaintPipeline`.

        White pixels of `mask_image` are repainted, black ones kept; without a mask the whole picture is repainted
        from `image` noised to `strength` (image-to-image). The output has the size of `image` (shrunk to 1
        megapixel, floored to the token size) unless `height` / `width` ask for another. `padding_mask_crop` repaints
        only a crop around the mask, that many pixels wider, and puts it back into the picture."""
        if image is None:
            raise UserError("inpainting needs `image`, the picture to repaint")
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"strength must be between 0 and 1, got {strength}")
        multiple = size_multiple(family)
        picture = _open(image, "image")
        mask = _open(mask_image, "mask_image") if mask_image is not None else Image.new("L", picture.size, 255)
        if padding_mask_crop is not None and call.get("output_type", "pil") != "pil":
            raise UserError("padding_mask_crop pastes the repainted crop into the picture: use output_type='pil'")
        size = inpaint_size(picture, multiple)
        width = size[0] if width is None else width
        height = size[1] if height is None else height
        height, width = _floored(int(height), int(width), multiple)
        overlay = None
        if padding_mask_crop is not None:
            full_mask = mask.convert("L").resize(picture.size)
            overlay = Overlay(picture, full_mask, crop_region(full_mask, width, height, padding_mask_crop))
        box = overlay.box if overlay else None
        repaint = Repaint(
            image=inpaint_image_tensor(picture, width, height, box),
            mask=mask_tensor(mask, width, height, box),
            strength=float(strength),
            overlay=overlay,
        )
        if not repaint.mask.any():
            raise UserError("mask_image marks nothing to repaint (it is all black); white pixels mark what to repaint")
        references, pictures = _references(image_reference, multiple)
        check_references(len(references) + 1)  # the picture itself is the first reference
        request = cls._resolve(
            family,
            prompt=prompt,
            references=references,
            pictures=(picture, *pictures),
            height=height,
            width=width,
            repaint=repaint,
            **call,
        )
        if request.num_steps - repaint.first_step(request.num_steps) < 1:
            raise UserError(
                f"strength {strength} leaves no denoising step of {request.num_steps}; raise strength or "
                "num_inference_steps"
            )
        return request

    @classmethod
    def _resolve(
        cls,
        family: FamilyConfig,
        *,
        prompt: str | list[str] | None,
        references: list[Tensor],
        pictures: tuple[Image.Image, ...],
        height: int,
        width: int,
        repaint: Repaint | None = None,
        caption_upsample_temperature: float | None = None,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        text_encoder_out_layers: tuple[int, ...] | None = None,
        show_progress: bool = True,
        cache: str | None = None,
        cache_threshold: float | None = None,
    ) -> GenerationRequest:
        """The arguments every call shares. `seed` is a shortcut for
        `generator=torch.Generator("cpu").manual_seed(seed)`; steps and guidance default to the family's.
        `caption_upsample_temperature` (dev only) rewrites the prompts with the text encoder first, as diffusers'
        `Flux2Pipeline` does. `cache="first-block"` skips the DiT's later blocks on steps whose first block changed
        by less than `cache_threshold` (default DEFAULT_CACHE_THRESHOLD)."""
        if (prompt is None) == (prompt_embeds is None):
            raise UserError("pass exactly one of `prompt` and `prompt_embeds`")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if prompts is not None and not prompts:
            raise UserError("`prompt` is an empty list; pass at least one prompt")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if generator is not None and seed is not None:
            raise UserError("pass `generator` or `seed`, not both")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        unknown = set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSORS)
        if unknown:
            raise UserError(f"callback_on_step_end_tensor_inputs may name latents and prompt_embeds, not {unknown}")
        fallback = defaults(family)
        steps = fallback.steps if num_inference_steps is None else num_inference_steps
        check_steps(steps)
        guidance = fallback.guidance if guidance_scale is None else guidance_scale
        if guidance < 0:
            raise UserError(f"guidance_scale must be >= 0, got {guidance}")
        if caption_upsample_temperature is not None:
            if family.text_encoder.arch != "mistral3":
                raise UserError(
                    f"caption upsampling is FLUX.2 [dev]'s; {family.name} has no Mistral 3 to write the text"
                )
            if prompts is None:
                raise UserError("caption upsampling rewrites `prompt`; it cannot rewrite prompt_embeds")
            if caption_upsample_temperature <= 0:
                raise UserError(f"caption_upsample_temperature must be > 0, got {caption_upsample_temperature}")
        if cache is not None and cache not in CACHE_METHODS:
            raise UserError(f"unknown cache method {cache!r}; use one of {', '.join(CACHE_METHODS)} (or None)")
        if cache_threshold is not None and cache is None:
            raise UserError("cache_threshold needs cache='first-block'")
        if cache_threshold is not None and cache_threshold < 0:
            raise UserError(f"cache_threshold must be >= 0, got {cache_threshold}")
        threshold = 0.0 if cache is None else DEFAULT_CACHE_THRESHOLD if cache_threshold is None else cache_threshold
        if sigmas is not None and (len(sigmas) < 1 or not all(0 < s <= 1 for s in sigmas)):
            raise UserError("sigmas must be a non-empty list of values in (0, 1], e.g. numpy.linspace(1, 1/N, N)")
        return cls(
            prompts=prompts,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            references=references,
            height=height,
            width=width,
            num_steps=int(steps),
            sigmas=None if sigmas is None else [float(s) for s in sigmas],
            guidance=float(guidance),
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            max_sequence_length=max_sequence_length or family.text_encoder.max_length,
            out_layers=tuple(text_encoder_out_layers) if text_encoder_out_layers else None,
            output_type=output_type,
            callback=callback_on_step_end,
            callback_inputs=tuple(callback_on_step_end_tensor_inputs),
            show_progress=show_progress,
            repaint=repaint,
            caption_upsample_temperature=caption_upsample_temperature,
            pictures=tuple(pictures),
            cache_threshold=float(threshold),
        )

    def image_parameters(
        self, *, prompt: str, model: str, seed: int, references=(), loras=(), init=None, mask=None, upsampled=None
    ) -> ImageParameters:
        """The PNG parameters of one image of this request (`init` and `mask` name an inpainting's pictures)."""
        return ImageParameters(
            prompt=prompt,
            model=model,
            seed=seed,
            width=self.width,
            height=self.height,
            steps=self.num_steps,
            guidance=self.guidance,
            references=tuple(str(r) for r in references),
            loras=tuple(loras),
            init=None if init is None else str(init),
            mask=None if mask is None else str(mask),
            strength=None if self.repaint is None else self.repaint.strength,
            upsampled_prompt=upsampled,
        )


def _floored(height: int, width: int, multiple: int) -> tuple[int, int]:
    floored = floor_size(height, width, multiple)
    if floored != (height, width):
        warnings.warn(
            f"size {width}x{height} is not a multiple of {multiple}; using {floored[1]}x{floored[0]}", stacklevel=5
        )
    return floored


def _open(image, name: str) -> Image.Image:
    """A PIL image or the file at a path, fully read; anything else is a UserError naming the argument."""
    if isinstance(image, (str, Path)):
        return open_reference_image(image, what=name)
    if not isinstance(image, Image.Image):
        raise UserError(f"{name} is a {type(image).__name__}; pass a PIL image or a file path")
    return image


def _references(image, multiple: int) -> tuple[list[Tensor], list[Image.Image]]:
    """Reference tensors, preprocessed as diffusers does, and the pictures as given (files opened)."""
    if image is None:
        return [], []
    images = image if isinstance(image, (list, tuple)) else [image]
    check_references(len(images))
    tensors, pictures = [], []
    for i, img in enumerate(images):
        name = str(img) if isinstance(img, (str, Path)) else f"#{i + 1}"
        if isinstance(img, (str, Path)):
            img = open_reference_image(img)
        if not isinstance(img, Image.Image):
            raise UserError(f"reference image {name} is a {type(img).__name__}; pass PIL images or file paths")
        tensors.append(reference_tensor(img, name, multiple))
        pictures.append(img)
    return tensors, pictures
