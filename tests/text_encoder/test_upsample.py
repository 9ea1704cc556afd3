"""Caption upsampling (FLUX.2 [dev]): the same text as diffusers' `Flux2Pipeline.upsample_prompt` for the same seed
on a tiny random Mistral 3, the pipeline call that upsamples first, and the errors."""

import importlib.util

import pytest
import torch
from PIL import Image

from featherflux.errors import UserError
from featherflux.pipeline import load_pipeline
from featherflux.text_encoder.upsample import SYSTEM_MESSAGE_I2I, SYSTEM_MESSAGE_T2I
from tests.tiny import _mistral3_encoder, build_diffusers_pipeline, load_diffusers_pipeline, tiny_pipeline_dir

PROMPTS = ["a dog is dancing", "a red apple on a wooden table"]


class TextProcessor:
    """The text half of PixtralProcessor's interface (what diffusers' upsample_prompt calls), around the tiny
    tokenizer: the real processor needs torchvision, which this machine cannot install beside its torch."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


SHALLOW = (1, 2, 3)  # text layers stacked by the shallow tiny dev below


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """A tiny dev pipeline whose Mistral 3 has 3 layers instead of 30: upsampling writes 512 tokens, one model pass
    each, so depth is what makes it slow."""
    pipe = build_diffusers_pipeline("dev")
    torch.manual_seed(2)
    pipe.text_encoder = _mistral3_encoder(len(pipe.tokenizer), layers=len(SHALLOW))
    folder = tmp_path_factory.mktemp("tiny") / "shallow-dev"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_system_messages_are_bfls():
    from diffusers.pipelines.flux2 import system_messages

    assert SYSTEM_MESSAGE_T2I == system_messages.SYSTEM_MESSAGE_UPSAMPLING_T2I
    assert SYSTEM_MESSAGE_I2I == system_messages.SYSTEM_MESSAGE_UPSAMPLING_I2I


def test_same_seed_same_text_as_diffusers(dev):
    ours = load_pipeline(dev, text_encoder_out_layers=SHALLOW)
    oracle = load_diffusers_pipeline(dev)
    oracle.tokenizer = TextProcessor(oracle.tokenizer)
    for temperature in (0.15, 0.9):
        torch.manual_seed(7)
        theirs = oracle.upsample_prompt(PROMPTS, temperature=temperature, device="cpu")
        torch.manual_seed(7)
        assert ours.upsample_prompt(PROMPTS, temperature=temperature) == theirs
    assert any(text for text in theirs)  # the tiny model does write something


def test_a_call_with_caption_upsample_temperature_encodes_the_rewritten_prompt(dev):
    pipe = load_pipeline(dev, text_encoder_out_layers=SHALLOW)
    call = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 0, "output_type": "np",
            "show_progress": False}
    torch.manual_seed(3)
    upsampled = pipe(prompt=PROMPTS[0], caption_upsample_temperature=0.5, **call).images
    torch.manual_seed(3)
    (rewritten,) = pipe.upsample_prompt(PROMPTS[0], temperature=0.5)
    assert (pipe(prompt=rewritten, **call).images == upsampled).all()


def test_upsampling_errors(dev, tmp_path):
    klein = load_pipeline(tiny_pipeline_dir("klein", tmp_path))
    with pytest.raises(UserError, match="FLUX.2 \\[dev\\]'s"):
        klein.upsample_prompt("a cat")
    with pytest.raises(ValueError, match="FLUX.2 \\[dev\\]'s"):
        klein(prompt="a cat", caption_upsample_temperature=0.15)
    embeds_only = load_pipeline(dev, text_encoder_out_layers=SHALLOW)
    embeds_only.prompt_encoder = None
    with pytest.raises(UserError, match="needs the text encoder"):
        embeds_only.upsample_prompt("a cat")
    with pytest.raises(UserError, match="cannot rewrite prompt_embeds"):
        embeds_only(prompt_embeds=torch.zeros(1, 4, 48), caption_upsample_temperature=0.15)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="transformers builds PixtralProcessor (pictures for the vision tower) only with torchvision",
)
def test_upsampling_with_a_picture_matches_diffusers(dev):
    ours = load_pipeline(dev, text_encoder_out_layers=SHALLOW)
    oracle = load_diffusers_pipeline(dev)
    picture = Image.new("RGB", (96, 64), "red")
    torch.manual_seed(1)
    theirs = oracle.upsample_prompt(PROMPTS[:1], images=[picture], device="cpu")
    torch.manual_seed(1)
    assert ours.upsample_prompt(PROMPTS[:1], images=[picture]) == theirs


def test_the_encode_server_upsamples_for_a_worker_without_the_text_encoder(dev):
    from featherflux.serve.encoder_service import create_encoder_app, load_pipeline_prompt_encoder
    from featherflux.text_encoder import RemotePromptEncoder
    from tests.serve.test_encoder_service import Server

    local = load_pipeline_prompt_encoder(str(dev), out_layers=SHALLOW)
    with Server(create_encoder_app(local)) as server:
        with RemotePromptEncoder(server.url) as client:
            remote = client.upsample(PROMPTS, temperature=0.5, seed=11)
        worker = load_pipeline(dev, text_encoder=server.url, text_encoder_out_layers=SHALLOW)
        torch.manual_seed(4)
        first = worker.upsample_prompt(PROMPTS[0])
        torch.manual_seed(4)
        assert worker.upsample_prompt(PROMPTS[0]) == first  # the worker's seed picks the server's sampling seed
    torch.manual_seed(11)
    assert remote == local.upsample(PROMPTS, temperature=0.5)


def test_generate_upsample_writes_both_prompts_and_the_seed_remakes_the_text(tmp_path, capsys):
    from featherflux.cli import main
    from featherflux.images import read_png_parameters

    model = str(tiny_pipeline_dir("dev", tmp_path))
    out = tmp_path / "up.png"
    args = ["generate", "a cat", "--model", model, "--upsample", "0.5", "--steps", "1", "--width", "64", "--height",
            "64", "--seed", "9", "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    meta = read_png_parameters(out)
    torch.manual_seed(9)
    (again,) = load_pipeline(model).upsample_prompt("a cat", temperature=0.5)
    assert meta["prompt"] == "a cat" and meta["upsampled_prompt"] == again
    assert f"upsampled prompt: {again}" in capsys.readouterr().err
