"""Hub downloads against a stand-in for the hub on loopback: only the files a run needs, resume after a cut, the
gated and not-FLUX.2 errors, `featherflux pull`, and `featherflux plan`'s download size."""

import json
import re
import shutil

import huggingface_hub.constants
import numpy as np
import pytest

from featherflux.cli import main
from featherflux.errors import UserError
from featherflux.loading.hub import download
from featherflux.pipeline import load_pipeline
from tests.hub_standin import COMMIT, HubStandIn
from tests.tiny import tiny_pipeline_dir

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    klein = tiny_pipeline_dir("klein", root)
    other = shutil.copytree(klein, root / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionPipeline"}))
    return {"tiny/klein": klein, "black-forest-labs/FLUX.2-klein-4B": klein, "tiny/gated": klein, "tiny/other": other}


def point_hub_at(stand_in: HubStandIn, cache, monkeypatch) -> None:
    """huggingface_hub reads HF_ENDPOINT at import: set what it derived from it, and a fresh cache."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stand_in.url)
    template = stand_in.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def hub(tiny, tmp_path, monkeypatch):
    with HubStandIn(tiny, gated={"tiny/gated"}) as stand_in:
        point_hub_at(stand_in, tmp_path / "cache", monkeypatch)
        yield stand_in


def fetched(stand_in, since: int = 0) -> set[str]:
    """The files the stand-in sent (GET) from its `since`-th request on, as repo paths."""
    return {re.sub(r"^/.+?/.+?/resolve/[^/]+/", "", path) for method, path, _ in stand_in.requests[since:]
            if method == "GET" and "/resolve/" in path}


def test_only_what_the_run_needs_is_downloaded_and_the_rest_follows_when_needed(hub, tiny):
    folder = download("tiny/klein", skip={"text_encoder", "tokenizer"})  # a worker with a remote encoder
    assert (folder / WEIGHTS).is_file() and (folder / "text_encoder" / "config.json").is_file()
    assert not (folder / "text_encoder" / "model.safetensors").exists() and not (folder / "tokenizer").exists()
    assert not any(name.startswith(("text_encoder/model", "tokenizer/")) for name in fetched(hub))
    before = len(hub.requests)
    pipe = load_pipeline("tiny/klein", download=True)  # a full run fetches the text encoder now, and only that
    assert "text_encoder/model.safetensors" in fetched(hub, before) and WEIGHTS not in fetched(hub, before)
    local = load_pipeline(tiny["tiny/klein"])
    call = {"prompt": "a dog is dancing", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 0,
            "output_type": "np", "show_progress": False}
    np.testing.assert_array_equal(pipe(**call).images, local(**call).images)
    assert pipe.model_id == "tiny/klein"


def test_an_interrupted_download_resumes(tiny, tmp_path, monkeypatch):
    with HubStandIn(tiny, cut={f"tiny/klein/{WEIGHTS}"}) as stand_in:
        point_hub_at(stand_in, tmp_path / "cache", monkeypatch)
        # huggingface_hub writes what arrives in chunks (10 MB); the tiny file needs small ones to land in part
        monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
        try:
            folder = download("tiny/klein")
        except UserError:  # the cut reached us: the next call resumes
            folder = download("tiny/klein")
        ranges = [r for method, path, r in stand_in.requests if method == "GET" and path.endswith(WEIGHTS)]
    assert (folder / WEIGHTS).read_bytes() == (tiny["tiny/klein"] / WEIGHTS).read_bytes()
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")  # the rest, not all again


def test_gated_and_not_flux2_repos_are_refused_before_large_files(hub):
    with pytest.raises(UserError, match="tiny/gated is gated: accept its licence at http.*tiny/gated"):
        download("tiny/gated")
    with pytest.raises(UserError, match="StableDiffusionPipeline pipeline, not FLUX.2"):
        download("tiny/other")
    with pytest.raises(UserError, match="nobody/nothing is not on the hub"):
        download("nobody/nothing")
    assert fetched(hub) == {"model_index.json"}  # only the index of the repo that is not FLUX.2


def test_pull_prints_the_folder_and_plan_tells_the_download_size(hub, tiny, capsys):
    assert main(["plan", "black-forest-labs/FLUX.2-klein-4B", "--vram", "24", "--ram", "64", "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)
    on_disk = sum(p.stat().st_size for p in tiny["tiny/klein"].rglob("*") if p.is_file())
    assert 0 < sizes["download_missing_bytes"] <= sizes["download_bytes"] <= on_disk
    assert main(["pull", "black-forest-labs/FLUX.2-klein-4B", "--without", "text_encoder"]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder.endswith(f"snapshots/{COMMIT}")
    assert main(["plan", "black-forest-labs/FLUX.2-klein-4B", "--vram", "24", "--ram", "64", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert 0 < after["download_missing_bytes"] < sizes["download_missing_bytes"]  # the text encoder is still missing


def test_a_transformer_file_or_a_remote_encoder_leaves_those_weights_on_the_hub(hub, tiny, tmp_path):
    from safetensors.torch import save_file

    from featherflux.weights import load_transformer

    bfl_file = tmp_path / "flux-2-tiny.safetensors"
    state = load_transformer(tiny["tiny/klein"] / "transformer").state_dict()
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in state.items()}, bfl_file)
    pipe = load_pipeline("tiny/klein", download=True, transformer=bfl_file)
    assert WEIGHTS not in fetched(hub) and "transformer/config.json" in fetched(hub)
    assert "text_encoder/model.safetensors" in fetched(hub)  # this run encodes locally
    assert pipe(prompt="a cat", height=64, width=64, num_inference_steps=1, seed=0, show_progress=False).images
