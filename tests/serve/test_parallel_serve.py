"""`featherflux serve --parallel`: one pipeline split over two processes behind one server (serve.ranks)."""

import base64
import io
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from featherflux.pipeline import load_pipeline
from featherflux.serve.ranks import decode_call, encode_call
from tests.serve.fakes import free_port

PROMPT = "a red circle on a blue background"


def test_calls_travel_as_json_and_png():
    picture = Image.new("RGB", (16, 8), (10, 200, 30))
    method, kwargs = decode_call(encode_call("inpaint", {
        "prompt": ["a", "b"], "image": picture, "image_reference": [picture, picture], "mask_image": None,
        "generator": [torch.Generator().manual_seed(7)], "strength": 0.5, "callback_on_step_end": print,
    }))
    assert method == "inpaint" and kwargs["prompt"] == ["a", "b"] and kwargs["strength"] == 0.5
    assert kwargs["generator"][0].initial_seed() == 7 and "callback_on_step_end" not in kwargs
    assert np.array_equal(np.asarray(kwargs["image_reference"][1]), np.asarray(picture))
    with pytest.raises(TypeError, match="cannot send a Tensor"):
        encode_call("__call__", {"latents": torch.zeros(1)})


def _start_ranks(tmp_path, port: int, master_port: int) -> list[subprocess.Popen]:
    ranks = []
    for rank in range(2):
        log = (tmp_path / f"rank{rank}.log").open("w")
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": "1",
        }
        ranks.append(subprocess.Popen(
            [sys.executable, "-m", "featherflux", "serve", "--parallel", "ring", "--port", str(port),
             "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        ))
    return ranks


def _wait_healthy(url: str, ranks, tmp_path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(r.poll() is None for r in ranks), (tmp_path / "rank0.log").read_text()[-2000:]
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the split server did not come up")


def test_split_server_answers_like_one_process_and_turns_unhealthy_when_a_rank_dies(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ranks = _start_ranks(tmp_path, port, free_port())
    try:
        _wait_healthy(url, ranks, tmp_path)
        body = {"prompt": PROMPT, "size": "64x64", "seed": 3, "steps": 3, "response_format": "b64_json"}
        response = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
        alone = load_pipeline("demo")(
            prompt=PROMPT, height=64, width=64, num_inference_steps=3, show_progress=False,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images[0]
        # the ring merges softmax blocks in another order than one kernel: a pixel may move by one level
        assert np.abs(served.astype(int) - np.asarray(alone, dtype=int)).max() <= 1
        # a job cancelled mid-run stops on both ranks at the same step: the next one still runs
        job = httpx.post(url + "/v1/jobs", json={"prompt": PROMPT, "size": "256x256", "steps": 100, "seed": 1}).json()
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] != "running":
            time.sleep(0.05)
        httpx.delete(f"{url}/v1/jobs/{job['id']}")
        again = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert again.status_code == 200 and httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        ranks[1].kill()
        ranks[1].wait()
        failed = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert failed.status_code >= 500
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    finally:
        for r in ranks:
            r.kill()
            r.wait()
