"""End to end over the real pipeline: a tiny random klein model saved in diffusers' layout, loaded by our loader,
served on loopback and driven by the `openai` client; and `featherflux serve` wiring its flags into the app."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from featherflux.cli import main
from featherflux.images import read_png_parameters
from featherflux.pipeline import load_pipeline
from featherflux.serve.api import create_app
from tests.serve.fakes import LiveServer
from tests.tiny import tiny_pipeline_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny"))


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def alone(pipe, prompt: str, seed: int, steps: int) -> np.ndarray:
    image = pipe(
        prompt=prompt,
        height=64,
        width=64,
        num_inference_steps=steps,
        show_progress=False,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_openai_client_over_the_tiny_pipeline_sixteen_clients_batched(tiny_dir, tmp_path):
    pipe = load_pipeline(tiny_dir)
    with LiveServer(create_app(pipe, output_dir=tmp_path, max_batch=4)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        edit = client.images.edit(
            image=("ref.png", _png((64, 64)), "image/png"),
            prompt="a dog is dancing",
            response_format="url",
            extra_body={"seed": 5, "steps": 2},
        )
        with Image.open(io.BytesIO(httpx.get(edit.data[0].url).content)) as image:
            assert image.size == (64, 64)

        def one(i):
            r = client.images.generate(
                prompt=f"a cat holding a sign {i}", size="64x64", extra_body={"seed": 100 + i, "steps": 2}
            )
            return pixels(base64.b64decode(r.data[0].b64_json))

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        stored = sorted(tmp_path.glob("*.png"))
        assert len(stored) == 17
        assert read_png_parameters(stored[0])["steps"] == 2
        assert read_png_parameters(stored[0])["model"] == pipe.model_id
    for i in range(16):  # every client got the picture its own prompt and seed make alone (batching changes no pixel
        expected = alone(pipe, f"a cat holding a sign {i}", 100 + i, 2)  # beyond float rounding)
        assert np.abs(results[i] - expected).max() <= 2, i
    assert np.abs(results[0] - results[1]).max() > 2  # and the pictures do differ from client to client


def _png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_lora(path, transformer, rank=2):
    """A BFL-named LoRA on the final projection: strong enough to change every pixel."""
    linear = transformer.final_layer.linear
    save_file(
        {
            "diffusion_model.final_layer.linear.lora_A.weight": torch.randn(rank, linear.in_features),
            "diffusion_model.final_layer.linear.lora_B.weight": torch.randn(linear.out_features, rank),
        },
        path,
    )


def test_featherflux_serve_command_serves_the_model_with_loras(tiny_dir, tmp_path, monkeypatch):
    served = {}
    monkeypatch.setattr("featherflux.serve.api.run_server", lambda app, **where: served.update(app=app, **where))
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "bold.safetensors", load_pipeline(tiny_dir).transformer)
    assert (
        main(
            [
                "serve",
                "--model",
                str(tiny_dir),
                "--output-dir",
                str(tmp_path / "out"),
                "--port",
                "8899",
                "--max-batch",
                "1",
                "--max-queue",
                "3",
                "--lora-dir",
                str(tmp_path / "loras"),
            ]
        )
        == 0
    )
    assert (served["host"], served["port"]) == ("127.0.0.1", 8899)
    assert served["app"].state.queue.max_queue == 3 and served["app"].state.queue.max_batch == 1
    with LiveServer(served["app"]) as live:
        health = httpx.get(live.url + "/health").json()
        assert health["defaults"] == {"size": "1024x1024", "steps": 4, "guidance": 1.0, "max_n": 4, "max_steps": 100}
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)

        def picture(**extra):
            result = client.images.generate(prompt="a dog", size="64x64", extra_body={"seed": 1, "steps": 1} | extra)
            return pixels(base64.b64decode(result.data[0].b64_json))

        plain, styled = picture(), picture(loras=[{"name": "bold", "scale": 1.0}])
        assert np.abs(plain - styled).max() > 10  # the adapter is applied for the job that names it
        assert np.array_equal(picture(), plain)  # and switched off for the next job that does not
        with pytest.raises(openai.BadRequestError, match="unknown LoRA 'thin'; available: bold"):
            picture(loras=["thin"])


def test_an_openai_masked_edit_inpaints_like_the_pipeline(tiny_dir, tmp_path):
    pipe = load_pipeline(tiny_dir)
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    mask = Image.new("RGBA", picture.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 40, 64))  # transparent left half: repaint it
    buffers = [io.BytesIO(), io.BytesIO()]
    picture.save(buffers[0], format="PNG")
    mask.save(buffers[1], format="PNG")
    with LiveServer(create_app(pipe, output_dir=tmp_path)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        served = client.images.edit(
            image=("picture.png", buffers[0].getvalue(), "image/png"),
            mask=("mask.png", buffers[1].getvalue(), "image/png"),
            prompt="a red ball",
            extra_body={"seed": 4, "steps": 3, "strength": 0.7},
        )
    grey = Image.new("L", picture.size, 0)
    grey.paste(255, (0, 0, 40, 64))
    expected = pipe.inpaint(
        prompt="a red ball", image=picture, mask_image=grey, strength=0.7, num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(4)], show_progress=False,
    ).images[0]
    assert served.size == "80x64"
    assert np.abs(pixels(base64.b64decode(served.data[0].b64_json)) - np.asarray(expected, dtype=np.int16)).max() <= 1
