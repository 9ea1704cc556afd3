"""Jobs across replicas: two replicas' apps (fake pipelines, real HTTP) share one job board on a local Ray cluster."""

import json
import time

import httpx
import pytest

from featherflux.scale.job_board import BOARD_NAME, QUEUE_FILE, JobBoard, shared_jobs
from featherflux.serve.api import create_app
from featherflux.serve.auth import add_key
from tests.serve.fakes import FakePipeline, LiveServer


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    """The output folder every replica writes (queue files included), its API keys file, and two users' headers."""
    out = tmp_path_factory.mktemp("shared-out")
    keys = out / "keys.txt"
    alice, bob = ({"Authorization": f"Bearer {add_key(keys, name)}"} for name in ("alice", "bob"))
    return out, keys, alice, bob


def replica_app(out, keys, rank, step_seconds=0.05):
    """Replica `rank`'s app, as `ray_serve.ImageService` builds it but over a fake pipeline."""
    return shared_jobs(create_app(FakePipeline(step_seconds=step_seconds), api_keys=keys, output_dir=out, max_batch=1,
                                  state_file=out / QUEUE_FILE.format(rank=rank)), replica=rank, api_keys=keys)


@pytest.fixture(scope="module")
def replicas(ray_cluster, shared_out):
    out, keys, alice, bob = shared_out
    with LiveServer(replica_app(out, keys, 0)) as first, LiveServer(replica_app(out, keys, 1)) as second:
        yield first, second, alice, bob


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


def poll(server, job_id, headers, done, timeout=20) -> dict:
    """The job as `server` answers it, once `done(job)` holds; every answer on the way must be a 200."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        if done(r.json()):
            return r.json()
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.05)


def finished(job):
    return job["state"] in ("succeeded", "failed", "cancelled")


def kill_board(ray, no_restart):
    ray.kill(ray.get_actor(BOARD_NAME, namespace=BOARD_NAME), no_restart=no_restart)


def test_a_killed_board_is_replaced_and_learns_every_job_again(ray_cluster, replicas):
    owner, other, alice, bob = replicas
    earlier = submit(owner, alice, steps=2)
    poll(owner, earlier, alice, finished)
    running = submit(owner, alice, steps=40)  # 2 s of fake steps
    poll(other, running, alice, lambda job: job["step"] > 0)
    kill_board(ray_cluster, no_restart=True)  # gone for good: the next replica that calls it creates a new one
    assert poll(other, earlier, alice, finished)["state"] == "succeeded"
    assert httpx.get(f"{other.url}/v1/jobs/{running}", headers=bob).status_code == 404  # the owner rule still holds
    assert httpx.get(f"{other.url}/v1/jobs/{running}").status_code == 401
    # the owner publishes its jobs to the new board, so their progress reaches the other replica again
    final = poll(other, running, alice, finished)
    assert final["state"] == "succeeded" and final["files"] == [f"{running}-0.png"]
    cancelled = submit(owner, alice, steps=100)
    assert httpx.delete(f"{other.url}/v1/jobs/{cancelled}", headers=alice).status_code == 200
    assert poll(owner, cancelled, alice, finished, timeout=10)["state"] == "cancelled"


def test_a_job_outlives_its_killed_replica_and_board(ray_cluster, shared_out, replicas):
    out, keys, alice, bob = shared_out
    _, other, _, _ = replicas

    @ray_cluster.remote(num_cpus=0)
    class Replica:  # a replica in its own process, which ray.kill ends at once, like a crash
        def __init__(self, out, keys, rank):
            # imports, not this module's names: the worker cannot import a test module
            from featherflux.scale.job_board import QUEUE_FILE, shared_jobs
            from featherflux.serve.api import create_app
            from tests.serve.fakes import FakePipeline, LiveServer

            app = create_app(FakePipeline(step_seconds=0.1), api_keys=keys, output_dir=out, max_batch=1,
                             state_file=out / QUEUE_FILE.format(rank=rank))
            self.server = LiveServer(shared_jobs(app, replica=rank, api_keys=keys)).__enter__()

        def url(self):
            return self.server.url

    actor = Replica.remote(out, keys, 2)
    doomed = type("Server", (), {"url": ray_cluster.get(actor.url.remote())})
    job_id = submit(doomed, alice, steps=100)  # 10 s of fake steps
    poll(other, job_id, alice, lambda job: job["step"] > 0)
    ray_cluster.kill(actor)
    kill_board(ray_cluster, no_restart=False)  # Ray restarts it, empty
    # the new board has not heard of the job and its replica is gone: the other replica reads its queue file
    assert poll(other, job_id, alice, lambda job: True)["state"] in ("queued", "running")
    assert httpx.get(f"{other.url}/v1/jobs/{job_id}", headers=bob).status_code == 404
    # replica 2 comes back (same rank, same queue file), resumes the job and finishes it
    with LiveServer(replica_app(out, keys, 2, step_seconds=0.002)) as back:
        final = poll(other, job_id, alice, finished)
        assert final["state"] == "succeeded" and final["files"] == [f"{job_id}-0.png"]
        assert httpx.get(f"{back.url}/v1/jobs/{job_id}", headers=alice).json()["state"] == "succeeded"


def test_a_job_whose_replica_stays_away_is_reported_failed_for_good(ray_cluster):
    board = JobBoard.remote(orphan_seconds=0.5)
    job_id, public = "a" * 32, {"state": "running", "step": 3}
    ray_cluster.get(board.publish.remote(job_id, 7, "alice", public, "first-start"))
    ray_cluster.get(board.publish.remote("b" * 32, 8, "alice", public, "first-start"))
    for _ in range(8):  # replica 8 keeps polling; replica 7 has stopped
        ray_cluster.get(board.take_cancels.remote(8))
        time.sleep(0.1)
    assert ray_cluster.get(board.get.remote("b" * 32))["public"]["state"] == "running"
    failed = ray_cluster.get(board.get.remote(job_id))["public"]
    assert failed["state"] == "failed" and failed["status"] == 503 and "replica 7" in failed["error"]
    # replica 7 comes back and resumes the job: it is told to cancel it, and the answer stays "failed"
    ray_cluster.get(board.publish_many.remote(7, "second-start", [(job_id, "alice", {"state": "queued", "step": 0})]))
    assert ray_cluster.get(board.take_cancels.remote(7))[1] == [job_id]
    assert ray_cluster.get(board.get.remote(job_id))["public"] == failed
    ray_cluster.kill(board)
