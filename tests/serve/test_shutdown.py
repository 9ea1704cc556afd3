"""SIGTERM with jobs in flight, then a restart on the same output folder: every accepted job completes once."""

import io
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from tests.serve.fakes import free_port, seed_colour


def start(output_dir, port):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.serve.fakes",
            "--port",
            str(port),
            "--output-dir",
            str(output_dir),
            "--step-seconds",
            "0.05",
        ]
    )
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "server exited"
        assert time.monotonic() < deadline, "server did not come up"
        try:
            httpx.get(f"http://127.0.0.1:{port}/health")
            return process
        except httpx.TransportError:
            time.sleep(0.1)


def test_sigterm_keeps_every_accepted_job_and_a_restart_finishes_them(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(tmp_path, port)
    try:
        with httpx.Client() as http:
            ids = [
                http.post(
                    url + "/v1/jobs", json={"prompt": f"job {i}", "size": "64x64", "steps": 20, "seed": i}
                ).json()["id"]
                for i in range(4)
            ]
            while http.get(f"{url}/v1/jobs/{ids[0]}").json()["state"] == "queued":
                time.sleep(0.02)
            body = {"prompt": "job 4", "size": "64x64", "steps": 20, "seed": 4}
            with ThreadPoolExecutor(1) as pool:  # an OpenAI-style request waiting for its picture
                waiting = pool.submit(http.post, url + "/v1/images/generations", json=body, timeout=30)
                while sum(http.get(f"{url}/health").json()["jobs"].values()) < 5:  # until it is accepted
                    time.sleep(0.02)
                with httpx.stream("GET", f"{url}/v1/jobs/{ids[-1]}/events", timeout=10) as stream:
                    lines = stream.iter_lines()
                    assert next(lines) in ("event: queued", "event: running")
                    server.send_signal(signal.SIGTERM)
                    events = [line for line in lines if line.startswith("event: ")]
                refused = waiting.result()
        assert events == ["event: shutdown"]  # open streams end instead of holding the shutdown up
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        ids.append(re.search(r"job ([0-9a-f]{32}) was saved", refused.json()["error"]["message"]).group(1))
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        server.kill()
    saved = (tmp_path / "queue.jsonl").read_text().splitlines()
    assert len(saved) == 5

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(tmp_path, port)
    try:
        deadline = time.monotonic() + 30
        while any(httpx.get(f"{url}/v1/jobs/{i}").json()["state"] != "succeeded" for i in ids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for n, job_id in enumerate(ids):
            job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
            assert len(job["files"]) == 1
            png = httpx.get(f"{url}/v1/files/{job['files'][0]}").content
            assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == seed_colour(n, f"job {n}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
