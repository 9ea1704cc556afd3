"""The prompt-encoding service and its client, over real HTTP on loopback.

Mechanics (auth, limits, errors, cache, batching, retries) run against `HashEncoder`, whose embedding of a prompt
is a pure function of the prompt, so a swapped or lost answer shows. Parity runs against the real text encoder
of a tiny pipeline saved to disk: the service's bytes equal local encoding, and a pipeline that encodes remotely
draws the same image.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Self

import httpx
import pytest
import torch
import uvicorn

from featherflux.errors import UserError
from featherflux.serve.encoder_service import create_encoder_app, load_pipeline_prompt_encoder
from featherflux.text_encoder.remote import RemoteEncoderError, RemotePromptEncoder
from featherflux.text_encoder.wire import WireError, decode_embeddings, encode_embeddings

DIM = 12


def hash_embedding(prompt: str, max_sequence_length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) + max_sequence_length)
    return torch.randn(max_sequence_length, DIM, generator=generator)


class HashEncoder:
    """A PromptEncoder whose output rows depend only on their prompt; records every batch it encodes."""

    model_id = "hash-encoder"
    family = "klein-4b"

    def __init__(self, seconds_per_call: float = 0.0, fail_on: str | None = None):
        self.seconds_per_call, self.fail_on = seconds_per_call, fail_on
        self.batches: list[list[str]] = []

    def encode(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        self.batches.append(list(prompts))
        time.sleep(self.seconds_per_call)
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError("encoder blew up")
        return torch.stack([hash_embedding(p, max_sequence_length) for p in prompts])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server on loopback in a thread."""

    def __init__(self, app, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "encode server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def metric(url: str, name: str, token: str | None = None) -> float:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    text = httpx.get(url + "/metrics", headers=headers).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# --- wire format


def test_wire_round_trip_is_exact_and_carries_metadata():
    embeds = torch.randn(3, 7, 5).to(torch.bfloat16)
    body = encode_embeddings(embeds, model_id="m", family="klein-4b", max_sequence_length=7)
    decoded, header = decode_embeddings(body, prompt_count=3, max_sequence_length=7)
    assert torch.equal(decoded, embeds) and decoded.dtype == torch.bfloat16
    assert (header.model_id, header.family, header.prompt_count, header.dtype) == ("m", "klein-4b", 3, "bfloat16")


def test_wire_rejects_garbage_and_mismatches():
    body = encode_embeddings(torch.zeros(2, 4, 3), model_id="m", family="f", max_sequence_length=4)
    with pytest.raises(WireError, match="not a valid safetensors"):
        decode_embeddings(b"\x80\x04garbage that might be a pickle")
    with pytest.raises(WireError, match="asked for 3 prompts"):
        decode_embeddings(body, prompt_count=3)
    with pytest.raises(WireError, match="max_sequence_length=8"):
        decode_embeddings(body, max_sequence_length=8)
    from safetensors.torch import save

    lying = save({"prompt_embeds": torch.zeros(2, 4, 3)}, metadata={**_metadata(body), "prompt_count": "5"})
    with pytest.raises(WireError, match="does not match the header"):
        decode_embeddings(lying)
    extra = save({"prompt_embeds": torch.zeros(2, 4, 3), "x": torch.zeros(1)}, metadata=_metadata(body))
    with pytest.raises(WireError, match="exactly 'prompt_embeds'"):
        decode_embeddings(extra)
    ints = save({"prompt_embeds": torch.zeros(2, 4, 3, dtype=torch.int64)}, metadata=_metadata(body))
    with pytest.raises(WireError, match="dtype"):
        decode_embeddings(ints)


def _metadata(body: bytes) -> dict[str, str]:
    import json

    return json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])["__metadata__"]


# --- the service with a hash encoder


def test_auth_accepted_and_refused():
    with Server(create_encoder_app(HashEncoder(), token="s3cret")) as server:
        with RemotePromptEncoder(server.url, token="s3cret") as client:
            assert torch.equal(client.encode(["a cat"], 8)[0], hash_embedding("a cat", 8))
        with pytest.raises(RemoteEncoderError, match="refused the token"):
            RemotePromptEncoder(server.url, token="wrong")
        with pytest.raises(RemoteEncoderError, match="refused the token"):
            RemotePromptEncoder(server.url)
        answer = httpx.post(server.url + "/v1/encode", json={"prompts": ["a"]}, headers={"Authorization": "Bearer x"})
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # probes need no token
        assert httpx.get(server.url + "/metrics").status_code == 401
    with Server(create_encoder_app(HashEncoder(), token="s3cret", metrics_public=True)) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200  # for a Prometheus scraper without the token
        assert httpx.post(server.url + "/v1/encode", json={"prompts": ["a"]}).status_code == 401  # the rest is not


def test_family_mismatch_is_a_clear_error():
    with (
        Server(create_encoder_app(HashEncoder())) as server,
        pytest.raises(RemoteEncoderError, match="encodes for family 'klein-4b'.*pipeline is 'flux.2-dev'"),
    ):
        RemotePromptEncoder(server.url, family="flux.2-dev")


def test_bad_requests_get_4xx_json_and_the_server_stays_up():
    encoder = HashEncoder()
    app = create_encoder_app(encoder, max_prompts=4, max_prompt_chars=100, max_body_bytes=2000)
    with Server(app) as server:
        url = server.url + "/v1/encode"
        cases = [
            (dict(content=b'{"prompts": ["a"'), 400, "not valid JSON"),
            (dict(content=b"[" * 1900), 400, "not valid JSON"),
            (dict(json={"prompts": []}), 400, "empty"),
            (dict(json={"prompts": "a cat"}), 400, "list of strings"),
            (dict(json={"prompts": ["a", 3]}), 400, "list of strings"),
            (dict(json=["a"]), 400, "JSON object"),
            (dict(json={"prompts": ["a"], "max_sequence_length": 0}), 400, "max_sequence_length"),
            (dict(json={"prompts": ["a"], "max_sequence_length": "64"}), 400, "max_sequence_length"),
            (dict(json={"prompts": ["a"], "guidance": 3}), 400, "unknown fields"),
            (dict(json={"prompts": ["a"] * 5}), 413, "limit is 4"),
            (dict(json={"prompts": ["a" * 101]}), 413, "limit is 100"),
            (dict(json={"prompts": ["a" * 90] * 30}), 413, "body is 2\\d+ bytes; the limit is 2000"),
            (dict(content=iter([b'{"prompts": ["', b"a" * 2500, b'"]}'])), 413, "exceeds the limit of 2000"),  # chunked
        ]
        for kwargs, status, message in cases:
            answer = httpx.post(url, **kwargs)
            assert answer.status_code == status, (kwargs, answer.text)
            assert re.search(message, answer.json()["error"]["message"]), answer.text
        assert encoder.batches == []  # nothing bad reached the encoder
        assert httpx.post(url, json={"prompts": ["fine"], "max_sequence_length": 4}).status_code == 200
        assert metric(server.url, 'featherflux_encoder_requests_total{code="400"}') == 9
        assert metric(server.url, 'featherflux_encoder_requests_total{code="413"}') == 4


def test_encoder_failure_is_a_500_and_the_client_retries_then_raises():
    encoder = HashEncoder(fail_on="boom")
    with Server(create_encoder_app(encoder)) as server:
        with RemotePromptEncoder(server.url, retries=2, backoff_s=0.01) as client:
            with pytest.raises(RemoteEncoderError, match="failed 3 times: 500 encoding failed"):
                client.encode(["boom"], 4)
            assert torch.equal(client.encode(["ok"], 4)[0], hash_embedding("ok", 4))  # still serving
        assert metric(server.url, 'featherflux_encoder_requests_total{code="500"}') == 3
        assert metric(server.url, "featherflux_encoder_encoder_errors_total") == 3


def test_cache_hit_shows_in_metrics_and_skips_the_encoder():
    encoder = HashEncoder()
    with Server(create_encoder_app(encoder)) as server, RemotePromptEncoder(server.url) as client:
        first = client.encode(["a red apple", "a dog"], 16)
        second = client.encode(["a dog", "a red apple", "a cat"], 16)
        assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
        assert encoder.batches == [["a red apple", "a dog"], ["a cat"]]
        assert metric(server.url, "featherflux_encoder_cache_hits_total") == 2
        assert metric(server.url, "featherflux_encoder_cache_misses_total") == 3
        client.encode(["a dog"], 8)  # other settings, other key
        assert encoder.batches[-1] == ["a dog"]


def test_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    row_bytes = 4 * DIM * 4
    app = create_encoder_app(HashEncoder(), cache_bytes=2 * row_bytes)
    with Server(app) as server, RemotePromptEncoder(server.url) as client:
        for prompt in ["a", "b", "a", "c"]:  # "a" is used again, so "b" is the one evicted
            client.encode([prompt], 4)
        assert [key[1] for key in app.state.cache.entries] == ["a", "c"]
        assert metric(server.url, "featherflux_encoder_cache_bytes") == 2 * row_bytes


def test_16_concurrent_clients_each_get_their_own_embeddings_in_shared_batches():
    encoder = HashEncoder(seconds_per_call=0.05)
    prompts = [f"prompt number {i}" for i in range(16)]
    with Server(create_encoder_app(encoder, batch_window_s=0.02)) as server:
        clients = [RemotePromptEncoder(server.url) for _ in prompts]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: clients[i].encode([prompts[i]], 32), range(16)))
        for prompt, embeds in zip(prompts, results):
            assert embeds.shape == (1, 32, DIM) and torch.equal(embeds[0], hash_embedding(prompt, 32))
        assert sorted(p for batch in encoder.batches for p in batch) == sorted(prompts)  # none lost or repeated
        assert len(encoder.batches) < 16  # requests that arrived together were encoded together
        assert metric(server.url, "featherflux_encoder_batch_requests_count") == len(encoder.batches)


def test_client_splits_prompt_lists_above_the_server_limit():
    encoder = HashEncoder()
    with Server(create_encoder_app(encoder, max_prompts=3)) as server, RemotePromptEncoder(server.url) as client:
        prompts = [f"p{i}" for i in range(7)]
        embeds = client.encode(prompts, 4)
        assert torch.equal(embeds, torch.stack([hash_embedding(p, 4) for p in prompts]))
        assert [len(b) for b in encoder.batches] == [3, 3, 1]


def test_slow_server_times_out_into_a_clear_error_after_retries():
    encoder = HashEncoder(seconds_per_call=1.0)
    with (
        Server(create_encoder_app(encoder)) as server,
        RemotePromptEncoder(server.url, timeout=0.5, retries=1, backoff_s=0.01) as client,
        pytest.raises(RemoteEncoderError, match="after 2 attempts.*Timeout"),
    ):
        client.encode(["slow"], 4)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(RemoteEncoderError, match="cannot reach the encode server"):
        RemotePromptEncoder(f"http://127.0.0.1:{_free_port()}", retries=1, backoff_s=0.01)
    with pytest.raises(UserError, match="http://"):
        RemotePromptEncoder("localhost:8700")


# --- a server process killed mid-request

SERVER_SCRIPT = """
import pathlib, sys, time
from featherflux.serve.encoder_service import run_encoder_server

class Encoder:
    model_id, family = "hash-encoder", "klein-4b"
    def encode(self, prompts, max_sequence_length=512):
        pathlib.Path(sys.argv[2]).touch()  # tells the test a request is inside the encoder
        time.sleep(60)

run_encoder_server(Encoder(), port=int(sys.argv[1]))
"""


def test_server_killed_mid_request_client_raises_cleanly_or_retries_onto_a_restart(tmp_path):
    port, busy = _free_port(), tmp_path / "busy"
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(port), str(busy)], env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120  # a cold torch import on a busy machine is slow
        while True:
            try:
                impatient = RemotePromptEncoder(url, retries=0)
                break
            except RemoteEncoderError:
                assert process.poll() is None and time.monotonic() < deadline, "encode server process did not start"
                time.sleep(0.2)
        patient = RemotePromptEncoder(url, retries=5, backoff_s=0.2)
        with ThreadPoolExecutor(2) as pool:
            failing = pool.submit(impatient.encode, ["abc"], 4)
            recovering = pool.submit(patient.encode, ["abcd"], 4)
            deadline = time.monotonic() + 30
            while not busy.exists():
                assert time.monotonic() < deadline, "the request never reached the encoder"
                time.sleep(0.05)
            time.sleep(0.2)  # let the second request reach the server's queue too
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            with pytest.raises(
                RemoteEncoderError, match="cannot reach the encode server.*(RemoteProtocolError|ReadError)"
            ):
                failing.result(timeout=10)
            # a new server comes up on the same port while the patient client backs off
            with Server(create_encoder_app(HashEncoder()), port=port):
                assert torch.equal(recovering.result(timeout=30), hash_embedding("abcd", 4)[None])
    finally:
        process.kill()
        process.wait()


# --- the real text encoder of tiny pipelines saved to disk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny import tiny_pipeline_dir

    scratch = tmp_path_factory.mktemp("tiny")
    return lambda kind: tiny_pipeline_dir(kind, scratch)


def test_service_embeddings_equal_local_encoding_bit_for_bit(tiny):
    encoder = load_pipeline_prompt_encoder(str(tiny("klein-base")))
    prompts = [f"a dog is dancing, take {i}" for i in range(16)]
    with Server(create_encoder_app(encoder, batch_window_s=0.02)) as server:
        with RemotePromptEncoder(server.url, family=encoder.family) as client:
            assert client.model_id == encoder.model_id
            remote = client.encode(prompts[:3], 48)
            assert remote.dtype == encoder.dtype and torch.equal(remote, encoder.encode(prompts[:3], 48))
        # 16 clients at once, merged into shared batches: each gets exactly its own prompt's local embedding
        clients = [RemotePromptEncoder(server.url) for _ in prompts]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: clients[i].encode([prompts[i]], 48), range(16)))
        for prompt, embeds in zip(prompts, results):
            assert torch.equal(embeds, encoder.encode([prompt], 48))


def test_pipeline_with_remote_encoder_draws_the_same_image(tiny, tmp_path, monkeypatch):
    import shutil

    import numpy as np
    from PIL import Image

    from featherflux.cli import main
    from featherflux.pipeline import load_pipeline
    from tests.tiny import copy_pipeline

    path = tiny("klein-base")  # true CFG: the empty negative prompt is encoded remotely too
    local = load_pipeline(path)
    with Server(create_encoder_app(load_pipeline_prompt_encoder(str(path)), token="t0ken")) as server:
        # a worker folder without text_encoder/ or tokenizer/: the pipeline never reads them
        worker = copy_pipeline(path, tmp_path / "worker")
        shutil.rmtree(worker / "text_encoder")
        shutil.rmtree(worker / "tokenizer")
        remote = load_pipeline(worker, text_encoder=server.url, text_encoder_token="t0ken")
        assert isinstance(remote.prompt_encoder, RemotePromptEncoder)
        kwargs = dict(
            prompt=["a red apple", "a dog"],
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=4.0,
            max_sequence_length=32,
            output_type="pt",
            show_progress=False,
        )
        expected = local(seed=7, **kwargs).images
        assert torch.equal(remote(seed=7, **kwargs).images, expected)
        assert metric(server.url, "featherflux_encoder_cache_misses_total", token="t0ken") == 3
        # the CLI: `generate --text-encoder URL`, token from the environment
        monkeypatch.setenv("FEATHERFLUX_TEXT_ENCODER_TOKEN", "t0ken")
        out = tmp_path / "remote.png"
        args = ["--steps", "2", "--guidance", "4", "--seed", "3", "--width", "64", "--height", "64", "-o", str(out)]
        assert main(["generate", "a red apple", "--model", str(worker), "--text-encoder", server.url, *args]) == 0
    drawn = local(prompt="a red apple", seed=3, height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                  show_progress=False).images[0]
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(drawn))


def test_pipeline_refuses_a_server_of_another_family(tiny):
    from featherflux.pipeline import load_pipeline

    with Server(create_encoder_app(load_pipeline_prompt_encoder(str(tiny("dev"))))) as server, pytest.raises(
        RemoteEncoderError, match="encodes for family 'custom-dev'.*pipeline is 'custom-klein-base'"
    ):
        load_pipeline(tiny("klein-base"), text_encoder=server.url)


def test_encode_server_command_serves_the_pipeline_encoder_with_its_token(tiny, tmp_path, monkeypatch):
    from featherflux.cli import main
    from featherflux.serve import encoder_service

    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    answers = []

    def serve_one_request(encoder, *, host, port, token, **limits):  # stands in for uvicorn.run
        with (
            Server(create_encoder_app(encoder, token=token, **limits)) as server,
            RemotePromptEncoder(server.url, token="s3cret") as client,
        ):
            answers.append((client.family, client.encode(["a cat"], 32), encoder.encode(["a cat"], 32)))

    monkeypatch.setattr(encoder_service, "run_encoder_server", serve_one_request)
    assert main(["encode-server", "--model", str(tiny("klein-base")), "--token-file", str(token_file)]) == 0
    ((family, remote, local),) = answers
    assert family == "custom-klein-base" and torch.equal(remote, local)
    token_file.write_text("two words")
    assert main(["encode-server", "--model", str(tiny("klein-base")), "--token-file", str(token_file)]) == 2


def test_upsample_endpoint_checks_its_body_and_its_encoder():
    with Server(create_encoder_app(HashEncoder())) as server:
        url = server.url + "/v1/upsample"
        cannot = httpx.post(url, json={"prompts": ["a cat"], "seed": 1})
        unknown = httpx.post(url, json={"prompts": ["a cat"], "colour": "red"})
        cold = httpx.post(url, json={"prompts": ["a cat"], "temperature": 0})
        pictures = httpx.post(url, json={"prompts": ["a cat"], "images": [["not base64!"]]})
    assert cannot.status_code == 400 and "cannot upsample" in cannot.json()["error"]["message"]
    assert unknown.status_code == 400 and "unknown fields" in unknown.json()["error"]["message"]
    assert cold.status_code == 400 and "temperature" in cold.json()["error"]["message"]
    assert pictures.status_code == 400 and "base64" in pictures.json()["error"]["message"]
