"""The HTTP API on a real loopback server, driven by the official `openai` client and raw HTTP."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from featherflux.serve.api import Limits, create_app
from featherflux.serve.auth import add_key
from tests.serve.fakes import FakePipeline, LiveServer, seed_colour


def png_bytes(size=(64, 64), colour="blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def colour(data: bytes):
    with Image.open(io.BytesIO(data)) as image:
        return image.getpixel((0, 0))


def client(server, key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe = FakePipeline()
    app = create_app(
        pipe, output_dir=tmp_path_factory.mktemp("out"), limits=Limits(max_n=4, max_steps=50, max_upload_bytes=200_000)
    )
    with LiveServer(app) as live:
        live.pipe = pipe
        yield live
    assert list((app.state.queue.output_dir / "uploads").iterdir()) == []  # every upload was used, then removed


def test_openai_client_generates_b64_and_url(server):
    c = client(server)
    result = c.images.generate(prompt="a red fox", n=2, size="64x64", extra_body={"seed": 11, "steps": 3})
    assert [colour(base64.b64decode(d.b64_json)) for d in result.data] == [
        seed_colour(11, "a red fox"),
        seed_colour(12, "a red fox"),
    ]
    result = c.images.generate(prompt="a red fox", size="80x64", response_format="url", extra_body={"seed": 11})
    (image,) = result.data
    data = httpx.get(image.url).content
    assert colour(data) == seed_colour(11, "a red fox")
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == (80, 64)
        assert json.loads(png.text["parameters"])["prompt"] == "a red fox"


def test_openai_client_edit_sends_one_or_many_references(server):
    c = client(server)
    before = len(server.pipe.calls)
    one = c.images.edit(
        image=("ref.png", png_bytes(), "image/png"),
        prompt="make it green",
        size="64x64",
        extra_body={"seed": 3, "steps": 2},
    )
    many = c.images.edit(
        image=[("a.png", png_bytes(), "image/png"), ("b.png", png_bytes((96, 64)), "image/png")],
        prompt="combine",
        extra_body={"seed": 4, "steps": 2},
    )
    assert colour(base64.b64decode(one.data[0].b64_json)) == seed_colour(3, "make it green")
    assert [c["references"] for c in server.pipe.calls[before:]] == [1, 2]
    assert many.size == "64x64"  # no size given: the first reference's size


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "size": "100x40"}, "size"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "size": "64x64", "n": 9}, "n"),
        ({"prompt": "x", "size": "64x64", "steps": 0}, "steps"),
        ({"prompt": "x", "size": "64x64", "steps": 500}, "steps"),
        ({"prompt": "x", "size": "64x64", "loras": ["nope"]}, "loras"),
        ({"prompt": "", "size": "64x64"}, "prompt"),
        ({"size": "64x64"}, "prompt"),
        ({"prompt": "x", "n": "many"}, "n"),
    ],
)
def test_bad_json_requests_get_a_4xx_naming_the_field(server, body, param):
    response = httpx.post(server.url + "/v1/images/generations", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_bad_uploads_get_a_4xx(server):
    url = server.url + "/v1/images/edits"
    not_image = httpx.post(url, data={"prompt": "x"}, files={"image": ("a.png", b"not a picture", "image/png")})
    too_big = httpx.post(url, data={"prompt": "x"}, files={"image": ("a.png", b"\0" * 300_000, "image/png")})
    too_small = httpx.post(url, data={"prompt": "x"}, files={"image": ("a.png", png_bytes((32, 32)), "image/png")})
    no_image = httpx.post(url, data={"prompt": "x"}, files={"other": ("a.txt", b"hi", "text/plain")})
    not_json = httpx.post(
        server.url + "/v1/images/generations", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert (not_image.status_code, not_image.json()["error"]["code"]) == (400, "invalid_image")
    assert (too_big.status_code, too_big.json()["error"]["code"]) == (413, "upload_too_large")
    assert too_small.status_code == 400 and ">= 64 px" in too_small.json()["error"]["message"]
    assert no_image.status_code == 400 and "reference image" in no_image.json()["error"]["message"]
    assert not_json.status_code == 400
    with pytest.raises(openai.BadRequestError, match="size"):
        client(server).images.generate(prompt="x", size="17x17")
    unknown_lora = httpx.post(url, data={"prompt": "x", "loras[]": "nope"}, files={"image": ("a.png", png_bytes())})
    assert unknown_lora.status_code == 400 and unknown_lora.json()["error"]["code"] == "unknown_lora"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/../queue.jsonl",
        "/v1/files/..%2fqueue.jsonl",
        "/v1/files/%2e%2e%2fqueue.jsonl",
        "/v1/files/%2fetc%2fpasswd",
        "/v1/files/..%5c..%5cqueue.jsonl",
        "/v1/files/uploads%2f" + "0" * 32 + ".png",
        "/v1/files/" + "0" * 32 + "-0.png",
        "/v1/files/queue.jsonl",
        "/v1/files/.queue.jsonl",
    ],
)
def test_files_serves_generated_names_only(server, path):
    response = httpx.get(server.url + path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_jobs_api_and_event_stream(server):
    server.pipe.gate = threading.Event()  # the job waits until the stream is open
    job = httpx.post(server.url + "/v1/jobs", json={"prompt": "stream me", "size": "64x64", "steps": 4, "seed": 9})
    assert job.status_code == 202
    job_id = job.json()["id"]
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) in ("event: queued", "event: running")
        server.pipe.gate.set()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    server.pipe.gate = None
    assert events[-1]["event"] == "done" and events[-1]["state"] == "succeeded"
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 4
    state = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
    assert state["state"] == "succeeded" and state["progress"] == 1.0
    assert colour(httpx.get(f"{server.url}/v1/files/{state['files'][0]}").content) == seed_colour(9, "stream me")
    assert httpx.get(f"{server.url}/v1/jobs/{'f' * 32}").status_code == 404


def test_metrics_and_health(server):
    httpx.post(server.url + "/v1/images/generations", json={"prompt": "m", "size": "64x64", "steps": 2})
    text = httpx.get(server.url + "/metrics").text
    assert "featherflux_queue_depth 0" in text
    assert 'featherflux_jobs{state="succeeded"}' in text
    assert "featherflux_step_seconds_count" in text and "featherflux_images_per_second" in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(values["featherflux_images_total"]) >= 1
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "<form" in httpx.get(server.url + "/").text


def test_queue_full_answers_429_with_retry_after_and_cancel_works(tmp_path):
    pipe = FakePipeline(step_seconds=0.05)
    app = create_app(pipe, output_dir=tmp_path, max_queue=2, max_batch=1)
    with LiveServer(app) as live:
        body = {"prompt": "slow", "size": "64x64", "steps": 100}
        ids = [httpx.post(live.url + "/v1/jobs", json=body).json()["id"]]
        while httpx.get(f"{live.url}/v1/jobs/{ids[0]}").json()["state"] != "running":
            time.sleep(0.02)
        ids += [httpx.post(live.url + "/v1/jobs", json=body).json()["id"] for _ in range(2)]
        full = httpx.post(live.url + "/v1/jobs", json=body)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client(live).images.generate(prompt="x", size="64x64")
        cancelled = [httpx.delete(f"{live.url}/v1/jobs/{i}").json() for i in ids[1:] + ids[:1]]
        assert [c["state"] for c in cancelled] == ["cancelled", "cancelled", "running"]  # running: at next step
        deadline = time.monotonic() + 5
        while httpx.get(f"{live.url}/v1/jobs/{ids[0]}").json()["state"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert len(pipe.calls) == 1  # the cancelled waiting jobs never ran


def test_api_keys_and_rate_limit(tmp_path):
    keys = tmp_path / "keys"
    alice, bob = add_key(keys, "alice"), add_key(keys, "bob")
    app = create_app(FakePipeline(), output_dir=tmp_path / "out", api_keys=keys, rate_limit=(60.0, 2))
    with LiveServer(app) as live:
        body = {"prompt": "k", "size": "64x64", "steps": 1}
        missing = httpx.post(live.url + "/v1/images/generations", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(live, key="ff-wrong").images.generate(prompt="k", size="64x64")
        job = client(live, key=alice).images.generate(prompt="k", size="64x64", extra_body={"steps": 1})
        assert len(job.data) == 1
        job_id = httpx.post(live.url + "/v1/jobs", json=body, headers={"Authorization": f"Bearer {alice}"}).json()["id"]
        limited = httpx.post(live.url + "/v1/jobs", json=body, headers={"Authorization": f"Bearer {alice}"})
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        # bob has his own bucket, and cannot see alice's job
        assert httpx.get(f"{live.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {bob}"}).status_code == 404
        assert (
            httpx.get(f"{live.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {alice}"}).status_code == 200
        )


def test_sixteen_concurrent_clients_each_get_their_own_picture(tmp_path):
    pipe = FakePipeline(step_seconds=0.005)
    app = create_app(pipe, output_dir=tmp_path, max_batch=4)
    with LiveServer(app) as live:

        def one(i):
            r = client(live).images.generate(
                prompt=f"client {i}", size="64x64", extra_body={"seed": 1000 + i, "steps": 3}
            )
            return [colour(base64.b64decode(d.b64_json)) for d in r.data]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        counts = httpx.get(live.url + "/health").json()["jobs"]
    assert results == [[seed_colour(1000 + i, f"client {i}")] for i in range(16)]
    assert counts["succeeded"] == 16
    assert sum(len(c["prompts"]) for c in pipe.calls) == 16
    assert max(len(c["prompts"]) for c in pipe.calls) > 1  # some requests shared a call


def test_metrics_report_device_memory_when_cuda_is_there(tmp_path, monkeypatch):
    from featherflux.serve.metrics import prometheus_text
    from featherflux.serve.queue import JobQueue

    for name, value in [
        ("is_available", True),
        ("device_count", 1),
        ("memory_allocated", 10),
        ("memory_reserved", 20),
        ("max_memory_allocated", 30),
    ]:
        monkeypatch.setattr(f"torch.cuda.{name}", lambda *args, value=value: value)
    text = prometheus_text(JobQueue(FakePipeline(), output_dir=tmp_path))
    assert 'featherflux_device_memory_bytes{device="cuda:0",kind="allocated"} 10' in text
    assert 'featherflux_device_memory_bytes{device="cuda:0",kind="peak_allocated"} 30' in text


def test_an_edit_with_an_openai_mask_inpaints_the_first_image(server):
    picture = png_bytes((96, 64), "blue")
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (48, 0, 96, 64))  # transparent right half: repaint it, as OpenAI defines masks
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    before = len(server.pipe.calls)
    result = client(server).images.edit(
        image=[("a.png", picture, "image/png"), ("ref.png", png_bytes(), "image/png")],
        mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="a red ball",
        extra_body={"seed": 5, "steps": 2, "strength": 0.6},
    )
    (call,) = server.pipe.calls[before:]
    assert call["strength"] == 0.6 and call["references"] == 2 and call["size"] == (96, 64)
    repaint = np.asarray(call["mask"])
    assert repaint.shape == (64, 96) and (repaint[:, 48:] == 255).all() and (repaint[:, :48] == 0).all()
    assert colour(base64.b64decode(result.data[0].b64_json)) == seed_colour(5, "a red ball")


def test_mask_and_strength_errors(server):
    url = server.url + "/v1/images/edits"
    no_image = httpx.post(url, data={"prompt": "x"}, files={"mask": ("m.png", png_bytes(), "image/png")})
    bad_strength = httpx.post(url, data={"prompt": "x", "strength": "2"}, files={"image": ("a.png", png_bytes())})
    not_image = httpx.post(
        url, data={"prompt": "x"}, files={"image": ("a.png", png_bytes()), "mask": ("m.png", b"nope", "image/png")}
    )
    empty = httpx.post(
        url, data={"prompt": "x"}, files={"image": ("a.png", png_bytes()), "mask": ("m.png", png_bytes(colour="black"))}
    )
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "mask"
    assert bad_strength.status_code == 400 and bad_strength.json()["error"]["param"] == "strength"
    assert not_image.status_code == 400 and not_image.json()["error"]["code"] == "invalid_image"
    assert empty.status_code == 400 and "nothing to repaint" in empty.json()["error"]["message"]


def test_metrics_need_a_key_when_the_server_has_keys_unless_made_public(tmp_path):
    keys = tmp_path / "keys"
    alice = add_key(keys, "alice")
    for public, expected in ((False, 401), (True, 200)):
        app = create_app(FakePipeline(), output_dir=tmp_path / "out", api_keys=keys, metrics_public=public)
        with LiveServer(app) as live:
            assert httpx.get(live.url + "/metrics").status_code == expected
            with_key = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {alice}"})
            assert with_key.status_code == 200 and "featherflux_queue_depth" in with_key.text


def test_upsample_rewrites_the_prompt_with_the_jobs_seed_and_the_png_keeps_both(server):
    def upsampled(seed):
        response = httpx.post(
            server.url + "/v1/images/generations",
            json={"prompt": "a fox", "size": "64x64", "steps": 1, "seed": seed, "upsample": 0.3, "response_format": "url"},
        )
        with Image.open(io.BytesIO(httpx.get(response.json()["data"][0]["url"]).content)) as png:
            return json.loads(png.text["parameters"])

    first, again, other = upsampled(5), upsampled(5), upsampled(6)
    assert first["prompt"] == "a fox" and first["upsampled_prompt"].startswith("a fox, in detail (0.3, ")
    assert first["upsampled_prompt"] == again["upsampled_prompt"] != other["upsampled_prompt"]
    assert server.pipe.calls[-1]["prompts"] == [other["upsampled_prompt"]]
    bad = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "size": "64x64", "upsample": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "upsample"
