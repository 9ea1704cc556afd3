"""`serve --ray --parallel`: each Ray Serve replica is a group of processes running one split pipeline."""

import base64
import io

import httpx
import numpy as np
import torch
from PIL import Image

from featherflux.pipeline import load_pipeline
from featherflux.scale.ray_serve import ReplicaSettings, deploy
from tests.serve.fakes import free_port

PROMPT = "a red circle on a blue background"


def test_a_replica_of_two_ranks_answers_like_one_process(ray_cluster, tmp_path):
    from ray import serve

    port = free_port()
    settings = ReplicaSettings(model="demo", output_dir=str(tmp_path), parallel="ring", ranks=2)
    assert settings.follower_command()[-4:] == ["--device", "cpu", "--parallel", "ring"]
    deploy(settings, host="127.0.0.1", port=port, replicas=1)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=300,
                       json={"prompt": PROMPT, "size": "64x64", "steps": 3, "seed": 3})
        assert r.status_code == 200, r.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))), dtype=int)
    finally:
        serve.shutdown()
    alone = load_pipeline("demo")(prompt=PROMPT, height=64, width=64, num_inference_steps=3, show_progress=False,
                                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(served - np.asarray(alone, dtype=int)).max() <= 1  # the ring's merge order: one level at most
