"""One request, three entry points: the pipeline call, `featherflux generate` and the HTTP API resolve the same
arguments to the same defaults, the same floored size and the same PNG metadata, and refuse the same bad size."""

import re
import warnings

import pytest
from fastapi.testclient import TestClient

from featherflux.cli import main
from featherflux.errors import UserError
from featherflux.images import read_png_parameters
from featherflux.model.config import FAMILIES
from featherflux.pipeline import load_pipeline
from featherflux.request import ImageParameters, defaults, floor_size, size_multiple
from featherflux.serve.api import create_app
from featherflux.serve.files import OUTPUT_NAME
from tests.tiny import tiny_pipeline_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny")))


def test_pipeline_cli_and_api_resolve_the_same_request(model, tmp_path):
    pipe = load_pipeline(model)
    with pytest.warns(UserWarning, match="using 96x64"):
        request = pipe.request("a cat", width=100, height=72, seed=5, show_progress=False)
    assert (request.width, request.height) == (96, 64)  # floored to the family's 16 px, as diffusers does
    assert (request.num_steps, request.guidance) == (pipe.family.default_steps, pipe.family.default_guidance)
    from_pipeline = request.image_parameters(prompt="a cat", model=pipe.model_id, seed=5).as_dict()
    assert pipe.generate(request)[0].size == (96, 64)

    out = tmp_path / "cli.png"
    assert main(["generate", "a cat", "--model", model, "--width", "100", "--height", "72", "--seed", "5",
                 "-o", str(out), "--device", "cpu"]) == 0
    from_cli = read_png_parameters(out)

    app = create_app(pipe, output_dir=tmp_path / "api")
    with TestClient(app) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "100x72", "seed": 5})
        assert answer.status_code == 200 and answer.json()["size"] == "96x64"  # the size made is reported
        (stored,) = [p for p in (tmp_path / "api").iterdir() if OUTPUT_NAME.fullmatch(p.name)]
        from_api = read_png_parameters(stored)
        health = client.get("/health").json()["defaults"]
    assert health["steps"] == request.num_steps and health["guidance"] == request.guidance

    assert from_pipeline == from_cli == from_api
    assert set(from_cli) == {f for f in ImageParameters.__dataclass_fields__} | {"software"}


def test_a_size_out_of_range_is_the_same_error_everywhere(model, tmp_path, capsys):
    with pytest.raises(UserError) as raised:
        floor_size(40, 100)
    message = str(raised.value)
    pipe = load_pipeline(model)
    with pytest.raises(UserError, match=re.escape(message)):
        pipe.request("a cat", width=100, height=40)
    assert main(["generate", "a cat", "--model", model, "--width", "100", "--height", "40"]) == 2
    assert message in capsys.readouterr().err
    with TestClient(create_app(pipe, output_dir=tmp_path)) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "100x40"})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == message


def test_defaults_come_from_the_family():
    demo = FAMILIES["demo"]
    assert defaults(demo).side == 64 and defaults(FAMILIES["klein-4b"]).side == 1024
    assert defaults(None) == defaults(FAMILIES["flux.2-dev"])  # a stand-in pipeline without a family
    assert size_multiple(demo) == 8 and size_multiple(FAMILIES["flux.2-dev"]) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert floor_size(1024, 1024) == (1024, 1024)  # a size already on the grid is not a notice


def test_cache_arguments_are_checked():
    from featherflux.model.config import get_family
    from featherflux.request import DEFAULT_CACHE_THRESHOLD, GenerationRequest

    family = get_family("demo")
    assert GenerationRequest.from_call(family, prompt="x").cache_threshold == 0.0
    assert GenerationRequest.from_call(family, prompt="x", cache="first-block").cache_threshold == DEFAULT_CACHE_THRESHOLD
    with pytest.raises(ValueError, match="unknown cache method 'taylor'; use one of first-block"):
        GenerationRequest.from_call(family, prompt="x", cache="taylor")
    with pytest.raises(ValueError, match="cache_threshold needs cache='first-block'"):
        GenerationRequest.from_call(family, prompt="x", cache_threshold=0.1)
    with pytest.raises(ValueError, match="cache_threshold must be >= 0"):
        GenerationRequest.from_call(family, prompt="x", cache="first-block", cache_threshold=-1)
