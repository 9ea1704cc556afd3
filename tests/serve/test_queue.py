import json
import time

import pytest
from PIL import Image

from featherflux.serve.queue import JobQueue, JobSpec, QueueFull
from tests.serve.fakes import FakePipeline, seed_colour


def spec(prompt="a cat", seed=1, size=64, steps=2, n=1, **kw) -> JobSpec:
    return JobSpec(prompt=prompt, width=size, height=size, steps=steps, guidance=4.0, seed=seed, n=n, **kw)


def wait_done(queue, jobs, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(queue.get(j.id).state not in ("succeeded", "failed", "cancelled") for j in jobs):
        assert time.monotonic() < deadline, [queue.get(j.id).state for j in jobs]
        time.sleep(0.01)


def colour_of(queue, name):
    with Image.open(queue.output_dir / name) as image:
        return image.getpixel((0, 0))


def test_owners_are_served_round_robin(tmp_path):
    pipe = FakePipeline()
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=1)
    jobs = [queue.submit("alice", spec(f"alice {i}")) for i in range(4)]
    jobs += [queue.submit("bob", spec(f"bob {i}")) for i in range(2)]
    jobs += [queue.submit("carol", spec("carol 0"))]
    queue.start()
    wait_done(queue, jobs)
    queue.close()
    order = [call["prompts"][0] for call in pipe.calls]
    assert order == ["alice 0", "bob 0", "carol 0", "alice 1", "bob 1", "alice 2", "alice 3"]


def test_compatible_jobs_share_a_call_and_keep_their_own_seeds(tmp_path):
    pipe = FakePipeline()
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=4)
    jobs = [queue.submit(f"user{i}", spec(f"p{i}", seed=100 + i)) for i in range(3)]
    jobs.append(queue.submit("user9", spec("two", seed=7, n=2)))  # would make 5 images: next call
    jobs.append(queue.submit("user8", spec("big", seed=8, size=128)))  # other size: its own call
    queue.start()
    wait_done(queue, jobs)
    queue.close()
    assert [len(c["prompts"]) for c in pipe.calls] == [3, 2, 1]
    for job in jobs:
        done = queue.get(job.id)
        assert done.state == "succeeded" and len(done.files) == job.spec.n
        for i, name in enumerate(done.files):
            assert colour_of(queue, name) == seed_colour(job.spec.seed + i, job.spec.prompt)
            with Image.open(queue.output_dir / name) as image:
                assert json.loads(image.text["parameters"])["seed"] == job.spec.seed + i


def test_batching_off_runs_one_job_per_call(tmp_path):
    pipe = FakePipeline()
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=1)
    jobs = [queue.submit(f"u{i}", spec(seed=i)) for i in range(3)]
    queue.start()
    wait_done(queue, jobs)
    queue.close()
    assert [len(c["prompts"]) for c in pipe.calls] == [1, 1, 1]


def test_reference_jobs_run_alone(tmp_path):
    pipe = FakePipeline()
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=4)
    from featherflux.serve import files

    refs = [files.save_upload(tmp_path, Image.new("RGB", (64, 64), "red")) for _ in range(2)]
    jobs = [queue.submit("a", spec(references=(refs[0],))), queue.submit("b", spec(references=(refs[1],)))]
    queue.start()
    wait_done(queue, jobs)
    queue.close()
    assert [(len(c["prompts"]), c["references"]) for c in pipe.calls] == [(1, 1), (1, 1)]
    assert [queue.get(j.id).state for j in jobs] == ["succeeded", "succeeded"]
    assert list((tmp_path / "uploads").iterdir()) == []  # a finished job's references are removed


def test_full_queue_refuses_with_retry_after(tmp_path):
    queue = JobQueue(FakePipeline(), output_dir=tmp_path, max_queue=2)
    queue.submit("a", spec())
    queue.submit("b", spec())
    with pytest.raises(QueueFull) as e:
        queue.submit("c", spec())
    assert e.value.retry_after >= 1


def test_cancel_queued_and_running_jobs(tmp_path):
    pipe = FakePipeline(step_seconds=0.02)
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=1)
    running = queue.submit("a", spec(steps=200))
    waiting = queue.submit("b", spec(steps=2))
    queue.cancel(waiting.id)
    assert queue.get(waiting.id).state == "cancelled"
    queue.start()
    while queue.get(running.id).step < 2:
        time.sleep(0.01)
    started = time.monotonic()
    queue.cancel(running.id)
    wait_done(queue, [running])
    assert time.monotonic() - started < 1.0  # stopped at the next step, not after 200
    assert queue.get(running.id).state == "cancelled" and queue.get(running.id).files == []
    assert len(pipe.calls) == 1
    queue.close()


def test_time_limit_fails_only_that_job(tmp_path):
    pipe = FakePipeline(step_seconds=0.02)
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=1, job_timeout=0.2)
    slow, quick = queue.submit("a", spec(steps=100)), queue.submit("b", spec(steps=2))
    queue.start()
    wait_done(queue, [slow, quick])
    queue.close()
    assert queue.get(slow.id).state == "failed" and queue.get(slow.id).status == 504
    assert "time limit" in queue.get(slow.id).error
    assert queue.get(quick.id).state == "succeeded"


def test_internal_failure_fails_only_the_bad_job(tmp_path):
    pipe = FakePipeline(fail_on="boom")
    queue = JobQueue(pipe, output_dir=tmp_path, max_batch=4)
    good, bad = queue.submit("a", spec("fine")), queue.submit("b", spec("boom"))
    queue.start()
    wait_done(queue, [good, bad])
    queue.close()
    assert queue.get(good.id).state == "succeeded"
    assert queue.get(bad.id).state == "failed" and queue.get(bad.id).status == 500


def test_progress_events_per_step(tmp_path):
    queue = JobQueue(FakePipeline(), output_dir=tmp_path)
    job = queue.submit("a", spec(steps=3))
    events = []
    queue.subscribe(job.id, events.append)
    queue.start()
    wait_done(queue, [job])
    queue.close()
    assert events[-1]["event"] == "shutdown"  # close() tells listeners the server is going away
    events = events[:-1]
    assert [(e["event"], e["step"]) for e in events] == [
        ("running", 0),
        ("progress", 1),
        ("progress", 2),
        ("progress", 3),
        ("done", 3),
    ]
    assert events[-1]["state"] == "succeeded" and events[-1]["progress"] == 1.0


def test_restart_resumes_waiting_and_interrupted_jobs(tmp_path):
    state = tmp_path / "queue.jsonl"
    pipe = FakePipeline(step_seconds=0.02)
    queue = JobQueue(pipe, output_dir=tmp_path, state_file=state, max_batch=1)
    jobs = [queue.submit("a", spec(f"job {i}", seed=i, steps=50)) for i in range(3)]
    queue.start()
    while queue.get(jobs[0].id).step < 2:
        time.sleep(0.01)
    queue.close(drain_seconds=0.05)  # too short to finish: the running job goes back to the file
    assert [queue.get(j.id).state for j in jobs] == ["queued"] * 3

    resumed = JobQueue(FakePipeline(), output_dir=tmp_path, state_file=state, max_batch=1)
    assert resumed.depth() == 3
    resumed.start()
    wait_done(resumed, jobs)
    resumed.close()
    for job in jobs:
        done = resumed.get(job.id)
        assert done.state == "succeeded"
        assert colour_of(resumed, done.files[0]) == seed_colour(job.spec.seed, job.spec.prompt)
    # finished jobs are still known after another restart
    assert JobQueue(FakePipeline(), output_dir=tmp_path, state_file=state).get(jobs[0].id).state == "succeeded"
