"""Prompt encoding against diffusers' own `encode_prompt` on tiny pipelines saved to disk."""

import pytest
import torch

from featherflux.errors import WeightsError
from featherflux.text_encoder import load_prompt_encoder
from tests.tiny import load_diffusers_pipeline, tiny_pipeline_dir

PROMPTS = ["a dog is dancing", "a cat holding a sign that says hello world"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _encoder(path, layers):
    return load_prompt_encoder(
        path / "text_encoder", path / "tokenizer", out_layers=layers, family="custom", model_id=str(path)
    )


@pytest.mark.parametrize(
    "kind, layers, kept",
    [
        ("dev", (10, 20, 30), 30),  # 30 == num_layers: the post-final-norm slot
        ("klein", (9, 18, 27), 27),  # layer 28 of 28 is never loaded or run
        ("klein", (2, 28, 5), 28),
    ],
)
def test_matches_diffusers_encode_prompt(scratch, kind, layers, kept):
    path = tiny_pipeline_dir(kind, scratch)
    encoder = _encoder(path, layers)
    assert len(encoder.model.layers) == kept
    oracle = load_diffusers_pipeline(path)
    ours = encoder.encode(PROMPTS, max_sequence_length=48)
    theirs, _ = oracle.encode_prompt(PROMPTS, device="cpu", max_sequence_length=48, text_encoder_out_layers=layers)
    assert ours.shape == (2, 48, 48)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # a call-time subset of the loaded layers, like diffusers' text_encoder_out_layers
    sub = tuple(sorted(layers)[:2]) + (1,)
    theirs, _ = oracle.encode_prompt(PROMPTS, device="cpu", max_sequence_length=48, text_encoder_out_layers=sub)
    torch.testing.assert_close(encoder.encode(PROMPTS, 48, out_layers=sub), theirs, rtol=0, atol=0)


def test_long_prompt_is_truncated_with_a_warning(scratch):
    encoder = _encoder(tiny_pipeline_dir("klein", scratch), (9, 18, 27))
    with pytest.warns(UserWarning, match="truncated"):
        out = encoder.encode(["a red apple on a wooden table, photo " * 10], max_sequence_length=16)
    assert out.shape == (1, 16, 48)


def test_layers_beyond_what_was_loaded_are_refused(scratch):
    path = tiny_pipeline_dir("klein", scratch)
    encoder = _encoder(path, (9, 18, 27))
    with pytest.raises(ValueError, match="text_encoder_out_layers"):
        encoder.encode(PROMPTS, 16, out_layers=(9, 18, 28))
    with pytest.raises(WeightsError, match="28 layers"):
        _encoder(path, (10, 20, 30))
