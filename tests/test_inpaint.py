"""Inpainting: parity with diffusers' Flux2KleinInpaintPipeline on tiny random klein pipelines, image-to-image
without a mask, dev inpainting, padding_mask_crop, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from featherflux import load_pipeline
from featherflux.errors import UserError
from tests.tiny import tiny_pipeline_dir

SEQ = 32


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def pipes(scratch):
    """kind -> (ours, diffusers' inpainting pipeline), loaded once per module."""
    from diffusers import Flux2KleinInpaintPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            path = tiny_pipeline_dir(kind, scratch)
            oracle = Flux2KleinInpaintPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
            oracle.set_progress_bar_config(disable=True)
            cache[kind] = (load_pipeline(path), oracle)
        return cache[kind]

    return get


def picture(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask(height, width, box):
    m = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    m[top:bottom, left:right] = 255
    return Image.fromarray(m)


CASES = [
    # kind, picture (h, w), strength, guidance, with a reference
    ("klein", (70, 90), 0.7, 1.0, False),  # non-square, floored to 64x80
    ("klein", (96, 64), 1.0, 1.0, True),
    ("klein-base", (64, 112), 0.7, 3.0, False),  # true CFG
    ("klein-base", (80, 80), 1.0, 4.0, True),
]


@pytest.mark.parametrize("kind, size, strength, guidance, with_reference", CASES)
def test_matches_diffusers(pipes, kind, size, strength, guidance, with_reference):
    ours, theirs = pipes(kind)
    kwargs = {
        "prompt": ["a dog is dancing", "a red apple"],
        "image": picture(*size),
        "mask_image": mask(*size, (10, 12, 50, 40)),
        "strength": strength,
        "num_inference_steps": 4,
        "guidance_scale": guidance,
        "max_sequence_length": SEQ,
        "output_type": "np",
    }
    if with_reference:
        kwargs["image_reference"] = picture(72, 88, seed=1)
    a = ours.inpaint(generator=torch.Generator().manual_seed(3), show_progress=False, **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert a.shape == b.shape and a.shape[0] == 2
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_the_kept_region_is_the_picture_and_no_mask_repaints_everything(pipes):
    ours, _ = pipes("klein")
    source = picture(64, 64, seed=4)
    call = {"prompt": "a cat", "image": source, "num_inference_steps": 3, "seed": 0, "show_progress": False}
    # in latent space (before the decoder mixes neighbouring pixels): the right half is the picture's, exactly
    left_half = ours.inpaint(mask_image=mask(64, 64, (0, 0, 32, 64)), output_type="latent", **call).images
    corner = ours.inpaint(mask_image=mask(64, 64, (0, 0, 1, 1)), output_type="latent", **call).images
    assert torch.equal(left_half[..., 4:], corner[..., 4:]) and not torch.equal(left_half, corner)
    whole = ours.inpaint(output_type="pt", **call).images  # no mask: image-to-image at strength 0.8
    weak = ours.inpaint(strength=0.3, output_type="pt", **call).images
    kept = ours.inpaint(mask_image=mask(64, 64, (0, 0, 1, 1)), output_type="pt", **call).images
    assert (whole - kept).abs().mean() > (weak - kept).abs().mean()  # a weaker strength stays closer to the picture


def test_dev_inpaints_with_its_guidance_embedding(scratch):
    pipe = load_pipeline(tiny_pipeline_dir("dev", scratch))
    source = picture(64, 96)
    out = pipe.inpaint(
        prompt="a cat", image=source, mask_image=mask(64, 96, (40, 0, 96, 64)), guidance_scale=4.0,
        num_inference_steps=3, seed=0, show_progress=False,
    ).images[0]
    assert out.size == (96, 64)


def test_padding_mask_crop_repaints_only_around_the_mask(pipes):
    ours, _ = pipes("klein")
    source = picture(128, 128, seed=5)
    out = ours.inpaint(
        prompt="a cat", image=source, mask_image=mask(128, 128, (80, 80, 100, 100)), padding_mask_crop=8,
        num_inference_steps=2, seed=0, show_progress=False,
    ).images[0]
    assert out.size == source.size
    original, made = np.asarray(source), np.asarray(out)
    assert np.array_equal(made[:64], original[:64])  # outside the mask the picture is untouched
    assert not np.array_equal(made[80:100, 80:100], original[80:100, 80:100])


def test_bad_input(pipes, tmp_path):
    ours, _ = pipes("klein")
    call = {"prompt": "a cat", "image": picture(64, 64), "num_inference_steps": 2}
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        ours.inpaint(strength=1.5, **call)
    with pytest.raises(UserError, match="leaves no denoising step"):
        ours.inpaint(strength=0.0, **call)
    with pytest.raises(UserError, match="marks nothing to repaint"):
        ours.inpaint(mask_image=mask(64, 64, (0, 0, 0, 0)), **call)
    (tmp_path / "mask.png").write_bytes(b"not a picture")
    with pytest.raises(UserError, match="mask_image .*mask.png cannot be read"):
        ours.inpaint(mask_image=tmp_path / "mask.png", **call)
    with pytest.raises(UserError, match="needs `image`"):
        ours.inpaint(prompt="a cat")
    small_mask = mask(32, 32, (0, 0, 16, 16))  # another size than the picture: resized to it, as diffusers does
    assert ours.inpaint(mask_image=small_mask, seed=0, show_progress=False, **call).images[0].size == (64, 64)
