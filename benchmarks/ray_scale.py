"""Scale-out on Ray: throughput with 1 and 2 workers, and Ray Serve's per-request overhead.

    python benchmarks/ray_scale.py [--model PATH] [--jobs 24] [--requests 16]

Prints, for the same pipeline and the same jobs:
- batch: images/s in-process, and on Ray Data with 1 and 2 actors (steady state: from the first image to the last,
  so actor start-up is reported apart);
- serve: images/s for `--requests` concurrent OpenAI requests on the single-process server and on Ray Serve with 1
  and 2 replicas, and the latency of GET /health (no pipeline work: the pure per-request overhead) and of one
  image, single-process against Ray Serve, with requests alternating between the two servers.
Without --model it builds the tiny random klein pipeline of the tests (tests/tiny.py). Each worker gets one CPU
slot and one intra-op thread; with N free cores, N workers should give up to N times the images/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("OMP_NUM_THREADS", "1")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_jobs(path: Path, count: int, steps: int) -> list:
    from featherflux.scale.jobs import read_jobs

    path.write_text("".join(json.dumps({"prompt": f"a red star number {i}", "seed": i, "size": "64x64",
                                        "steps": steps}) + "\n" for i in range(count)))
    return read_jobs(path)[0]


def steady_rate(times: list[float]) -> float:
    """Images per second between the first and the last image (start-up excluded)."""
    return (len(times) - 1) / (times[-1] - times[0])


def bench_batch(model: str, jobs: list, scratch: Path) -> None:
    import torch

    from featherflux.scale.batch import _render_in_process
    from featherflux.scale.ray_batch import render_on_ray

    torch.set_num_threads(1)
    runs = [("in-process", lambda out: _render_in_process(jobs, out, scratch, model, device="cpu", dtype=None))]
    for workers in (1, 2):
        runs.append((f"ray data, {workers} actor(s)", lambda out, w=workers: render_on_ray(
            jobs, out, scratch, model, workers=w, address=None, device="cpu", dtype=None)))
    for name, render in runs:
        out = scratch / name.replace(" ", "_").replace(",", "")
        out.mkdir()
        start = time.perf_counter()
        times = [time.perf_counter() for record in render(out) if "error" not in record]
        assert len(times) == len(jobs), f"{name}: {len(jobs) - len(times)} jobs failed"
        print(f"batch  {name:26s} {steady_rate(times):6.2f} images/s steady, first image after "
              f"{times[0] - start:5.1f} s, {len(jobs)} images in {times[-1] - start:5.1f} s", flush=True)


def post_image(url: str, seed: int, steps: int) -> float:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/images/generations", timeout=600,
                   json={"prompt": f"a blue circle {seed}", "size": "64x64", "steps": steps, "seed": seed})
    r.raise_for_status()
    return time.perf_counter() - start


def get_health(url: str) -> float:
    start = time.perf_counter()
    httpx.get(url + "/health").raise_for_status()
    return time.perf_counter() - start


def throughput(name: str, url: str, requests: int, steps: int) -> None:
    post_image(url, 10_000, steps)  # warm up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        list(pool.map(lambda s: post_image(url, s, steps), range(requests)))
    print(f"serve  {name:26s} {requests / (time.perf_counter() - start):6.2f} images/s ({requests} concurrent)",
          flush=True)


def overhead(single: str, on_ray: str, steps: int) -> None:
    """Alternate requests between the two servers, so the machine's changing load hits both alike."""
    for what, call, count in (("GET /health", get_health, 100), ("one image", lambda u: post_image(u, 7, steps), 10)):
        pairs = [(call(single), call(on_ray)) for _ in range(count)]
        a, b = (statistics.median(x) * 1000 for x in zip(*pairs))
        print(f"serve  {what:12s} median: single process {a:7.1f} ms, ray serve {b:7.1f} ms, "
              f"ray overhead {b - a:+7.1f} ms", flush=True)


def start_single_server(model: str, scratch: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    from tests.serve.fakes import free_port

    port = free_port()
    script = ("import sys; from pathlib import Path; from featherflux.pipeline import load_pipeline; "
              "from featherflux.serve.api import create_app, run_server; "
              f"run_server(create_app(load_pipeline(sys.argv[1]), output_dir=Path(sys.argv[2]), max_batch={max_batch}),"
              " port=int(sys.argv[3]))")
    server = subprocess.Popen([sys.executable, "-c", script, model, str(scratch / "single"), str(port)],
                              env=os.environ | WORKER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            get_health(url)
            return server, url
        except httpx.TransportError:
            assert server.poll() is None, "the single-process server did not start"
            time.sleep(0.5)


def bench_serve(model: str, scratch: Path, requests: int, steps: int, max_batch: int) -> None:
    from ray import serve

    from featherflux.scale.ray_serve import ReplicaSettings, deploy
    from tests.serve.fakes import free_port

    server, single = start_single_server(model, scratch, max_batch)
    try:
        throughput("single process", single, requests, steps)
        port = free_port()
        on_ray = f"http://127.0.0.1:{port}"
        settings = ReplicaSettings(model=model, output_dir=str(scratch / "ray-serve"), max_batch=max_batch)
        for replicas in (1, 2):
            start = time.perf_counter()
            deploy(settings, host="127.0.0.1", port=port, replicas=replicas)
            print(f"serve  ray serve: {replicas} replica(s) up after {time.perf_counter() - start:.1f} s", flush=True)
            if replicas == 1:
                post_image(on_ray, 10_000, steps)
                overhead(single, on_ray, steps)
            throughput(f"ray serve, {replicas} replica(s)", on_ray, requests, steps)
        serve.shutdown()
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="pipeline folder (default: build the tests' tiny klein)")
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=1, help="server images per pipeline call (default 1)")
    parser.add_argument("--only", choices=["batch", "serve"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny and tests.serve.fakes
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = args.model
        if model is None:
            from tests.tiny import save_tiny_pipeline

            model = str(save_tiny_pipeline("klein", scratch / "tiny-klein"))
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; model {model}", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
        if args.only != "serve":
            bench_batch(model, write_jobs(scratch / "jobs.jsonl", args.jobs, args.steps), scratch)
        if args.only != "batch":
            bench_serve(model, scratch, args.requests, args.steps, args.max_batch)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
