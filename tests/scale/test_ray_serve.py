"""The image service on Ray Serve: two replicas of the tiny klein pipeline on a local CPU cluster."""

import base64
import concurrent.futures
import io
import json

import httpx
import pytest
from PIL import Image

from featherflux.errors import UserError
from featherflux.scale.ray_serve import ReplicaSettings, app, build_app, deploy
from tests.serve.fakes import free_port


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_klein, tmp_path_factory):
    from ray import serve

    out = tmp_path_factory.mktemp("serve-out")
    port = free_port()
    deploy(ReplicaSettings(model=str(tiny_klein), output_dir=str(out)), host="127.0.0.1", port=port, replicas=2)
    yield f"http://127.0.0.1:{port}", out
    serve.shutdown()


def test_two_replicas_answer_16_concurrent_requests_once_each(service):
    url, out = service

    def generate(seed):
        r = httpx.post(url + "/v1/images/generations", timeout=300,
                       json={"prompt": f"a blue circle {seed}", "size": "64x64", "steps": 2, "seed": seed})
        assert r.status_code == 200, r.text
        (item,) = r.json()["data"]
        return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        images = list(pool.map(generate, range(16)))
    assert [json.loads(image.text["parameters"])["seed"] for image in images] == list(range(16))
    # every request became exactly one job on exactly one replica, and both replicas took some
    per_replica = [[json.loads(line) for line in (out / f"queue-replica-{rank}.jsonl").read_text().splitlines()]
                   for rank in (0, 1)]
    seeds = sorted(job["spec"]["seed"] for jobs in per_replica for job in jobs)
    assert seeds == list(range(16))
    assert all(jobs for jobs in per_replica)
    assert len(list(out.glob("*-0.png"))) == 16


def test_jobs_api_answers_through_either_replica(service):
    url, _ = service
    ids = [httpx.post(url + "/v1/jobs", json={"prompt": "a star", "size": "64x64", "steps": 2, "seed": s}).json()["id"]
           for s in range(4)]
    for job_id in ids * 4:  # the router picks a replica per request; each must know every job
        r = httpx.get(f"{url}/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["id"] == job_id


def test_serve_config_builder_checks_its_args(tiny_klein):
    assert app({"model": str(tiny_klein), "autoscale": "1:3", "gpus_per_replica": 0}) is not None
    with pytest.raises(UserError, match="unknown"):
        app({"model": str(tiny_klein), "replica": 2})
    with pytest.raises(UserError, match="MIN:MAX"):
        build_app(ReplicaSettings(model="x"), autoscale=(3, 1))
