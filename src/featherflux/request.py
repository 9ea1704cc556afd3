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
from featherflux.images import open_reference_image, reference_tensor
from featherflux.model.config import FAMILIES, FamilyConfig

MAX_REFERENCES = 10
MIN_SIDE = 64
MAX_PIXELS = 4 * 1024 * 1024
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("latents", "prompt_embeds")


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
            "software": "featherflux",
        }


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

    @classmethod
    def from_call(
        cls,
        family: FamilyConfig,
        *,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        text_encoder_out_layers: tuple[int, ...] | None = None,
        show_progress: bool = True,
    ) -> GenerationRequest:
        """The request of a pipeline call with diffusers' keyword names, checked, with the family's defaults.

        `seed` is a shortcut for `generator=torch.Generator("cpu").manual_seed(seed)`. `image` is one reference
        (a PIL image or a file path) or a list of them. A size that is not a multiple of the family's token size is
        floored, with a warning."""
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
        multiple = size_multiple(family)
        references = _references(image, multiple)
        fallback = defaults(family)
        if height is None or width is None:
            ref_h, ref_w = references[0].shape[-2:] if references else (None, None)
            height = height if height is not None else ref_h or fallback.side  # 0 is a bad size, not "default"
            width = width if width is not None else ref_w or fallback.side
        height, width = int(height), int(width)
        floored = floor_size(height, width, multiple)
        if floored != (height, width):
            warnings.warn(
                f"size {width}x{height} is not a multiple of {multiple}; using {floored[1]}x{floored[0]}", stacklevel=4
            )
        steps = fallback.steps if num_inference_steps is None else num_inference_steps
        check_steps(steps)
        if sigmas is not None and (len(sigmas) < 1 or not all(0 < s <= 1 for s in sigmas)):
            raise UserError("sigmas must be a non-empty list of values in (0, 1], e.g. numpy.linspace(1, 1/N, N)")
        return cls(
            prompts=prompts,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            references=references,
            height=floored[0],
            width=floored[1],
            num_steps=int(steps),
            sigmas=None if sigmas is None else [float(s) for s in sigmas],
            guidance=float(fallback.guidance if guidance_scale is None else guidance_scale),
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            max_sequence_length=max_sequence_length or family.text_encoder.max_length,
            out_layers=tuple(text_encoder_out_layers) if text_encoder_out_layers else None,
            output_type=output_type,
            callback=callback_on_step_end,
            callback_inputs=tuple(callback_on_step_end_tensor_inputs),
            show_progress=show_progress,
        )

    def image_parameters(self, *, prompt: str, model: str, seed: int, references=(), loras=()) -> ImageParameters:
        """The PNG parameters of one image of this request."""
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
        )


def _references(image, multiple: int) -> list[Tensor]:
    if image is None:
        return []
    images = image if isinstance(image, (list, tuple)) else [image]
    check_references(len(images))
    out = []
    for i, img in enumerate(images):
        name = str(img) if isinstance(img, (str, Path)) else f"#{i + 1}"
        if isinstance(img, (str, Path)):
            img = open_reference_image(img)
        if not isinstance(img, Image.Image):
            raise UserError(f"reference image {name} is a {type(img).__name__}; pass PIL images or file paths")
        out.append(reference_tensor(img, name, multiple))
    return out
