"""Errors fit Python habits: every bad argument is a ValueError (so `except ValueError` written for diffusers
catches it), and a file or folder that is not there is also a FileNotFoundError."""

import pytest
from PIL import Image

from featherflux.errors import UserError, WeightsError
from featherflux.images import open_reference_image
from featherflux.pipeline import load_pipeline
from featherflux.weights import load_transformer


@pytest.fixture(scope="module")
def demo():
    return load_pipeline("demo")


BAD_CALLS = [
    {"prompt": "a cat", "width": 32},  # size out of range
    {"prompt": "a cat", "num_inference_steps": 0},
    {"prompt": "a cat", "guidance_scale": -1.0},
    {"prompt": "a cat", "output_type": "gif"},
    {"prompt": "a cat", "image": [Image.new("RGB", (64, 64))] * 11},  # too many references
    {"prompt": "a cat", "image": Image.new("RGB", (16, 16))},  # a reference too small
    {"prompt": "a cat", "num_images_per_prompt": 0},
    {"prompt": "a cat", "sigmas": [1.5]},
    {"prompt": "a cat", "callback_on_step_end_tensor_inputs": ["noise"]},
    {"prompt": []},
    {},  # neither prompt nor prompt_embeds
]


@pytest.mark.parametrize("call", BAD_CALLS)
def test_every_bad_argument_is_a_value_error(demo, call):
    with pytest.raises(ValueError) as raised:
        demo(**call)
    assert isinstance(raised.value, UserError) and str(raised.value)


def test_bad_inpainting_arguments_are_value_errors(demo):
    with pytest.raises(ValueError, match="strength"):
        demo.inpaint(prompt="a cat", image=Image.new("RGB", (64, 64)), strength=-0.5)
    with pytest.raises(ValueError, match="needs `image`"):
        demo.inpaint(prompt="a cat")


def test_missing_files_are_file_not_found_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as raised:
        load_transformer(tmp_path / "flux.safetensors")
    assert isinstance(raised.value, WeightsError)
    with pytest.raises(FileNotFoundError, match="reference image"):
        open_reference_image(tmp_path / "ref.png")


def test_a_missing_optional_dependency_names_the_extra_to_install(monkeypatch, capsys):
    import sys

    from featherflux.cli import main
    from featherflux.memory.quant import quantize
    from featherflux.text_encoder import RemotePromptEncoder
    from featherflux.weights.gguf import gguf_package

    for module in ("httpx", "gguf", "bitsandbytes", "ray", "fastapi"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    for loaded in ("featherflux.serve.api", "featherflux.serve.encoder_service", "featherflux.scale.ray_serve"):
        monkeypatch.delitem(sys.modules, loaded, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'featherflux\[serve\]'"):
        RemotePromptEncoder("http://127.0.0.1:9")
    with pytest.raises(ImportError, match=r"pip install 'featherflux\[quant\]'"):
        gguf_package()
    import torch

    with pytest.raises(ImportError, match=r"NF4 quantization needs the quant extra"):
        quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4")
    for argv, extra in ((["serve", "--ray"], "ray"), (["serve"], "serve"), (["encode-server", "--model", "m"], "serve")):
        assert main(argv) == 2
        assert f"pip install 'featherflux[{extra}]'" in capsys.readouterr().err
