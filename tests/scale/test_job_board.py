"""Jobs across replicas: two replicas' apps (fake pipelines, real HTTP) share one job board on a local Ray cluster."""

import json
import time

import httpx
import pytest

from featherflux.scale.job_board import shared_jobs
from featherflux.serve.api import create_app
from featherflux.serve.auth import add_key
from tests.serve.fakes import FakePipeline, LiveServer


@pytest.fixture(scope="module")
def replicas(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared-out")
    keys = out / "keys.txt"
    key = add_key(keys, "alice")
    other = add_key(keys, "bob")
    apps = [shared_jobs(create_app(FakePipeline(step_seconds=0.05), api_keys=keys, output_dir=out, max_batch=1,
                                   state_file=out / f"queue-replica-{rank}.jsonl"), replica=rank, api_keys=keys)
            for rank in (0, 1)]
    with LiveServer(apps[0]) as first, LiveServer(apps[1]) as second:
        yield first, second, {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {other}"}


def submit(server, headers, steps=20) -> str:
    r = httpx.post(server.url + "/v1/jobs", json={"prompt": "a star", "size": "64x64", "steps": steps, "seed": 1},
                   headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_another_replica_answers_streams_and_finishes_a_job(replicas):
    owner, other, alice, bob = replicas
    job_id = submit(owner, alice, steps=10)
    seen = httpx.get(f"{other.url}/v1/jobs/{job_id}", headers=alice)
    assert seen.status_code == 200 and seen.json()["id"] == job_id
    assert httpx.get(f"{other.url}/v1/jobs/{job_id}", headers=bob).status_code == 404  # not bob's job
    assert httpx.get(f"{other.url}/v1/jobs/{job_id}").status_code == 401
    with httpx.stream("GET", f"{other.url}/v1/jobs/{job_id}/events", headers=alice, timeout=30) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["event"] == "done" and events[-1]["state"] == "succeeded"
    assert all(e["id"] == job_id for e in events)
    final = httpx.get(f"{other.url}/v1/jobs/{job_id}", headers=alice).json()
    assert final["state"] == "succeeded" and final["files"] == [f"{job_id}-0.png"]
    assert httpx.get(f"{other.url}/v1/files/{job_id}-0.png").status_code == 200  # one shared output folder


def test_cancel_through_another_replica_stops_the_job_on_its_owner(replicas):
    owner, other, alice, _ = replicas
    running = submit(owner, alice, steps=100)  # 5 s of fake steps
    queued = submit(owner, alice, steps=100)
    for job_id in (queued, running):
        assert httpx.delete(f"{other.url}/v1/jobs/{job_id}", headers=alice).status_code == 200
    deadline = time.monotonic() + 10
    states = {}
    while time.monotonic() < deadline and set(states.values()) != {"cancelled"}:
        states = {j: httpx.get(f"{owner.url}/v1/jobs/{j}", headers=alice).json()["state"] for j in (running, queued)}
        time.sleep(0.1)
    assert states == {running: "cancelled", queued: "cancelled"}
    assert httpx.get(f"{other.url}/v1/jobs/{running}", headers=alice).json()["step"] < 100
