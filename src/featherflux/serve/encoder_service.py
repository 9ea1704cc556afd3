"""The prompt-encoding service: one text encoder behind HTTP, shared by many generation workers.

    POST /v1/encode   {"prompts": [...], "max_sequence_length": 512} -> safetensors body (see `wire.py`)
    POST /v1/upsample {"prompts": [...], "temperature": 0.15, "seed": 7, "images": [["<base64 PNG>"]]}
                      -> {"prompts": [...]}: caption upsampling with the whole model (FLUX.2 [dev])
    GET  /v1/models   the model id, family and limits (the client checks the family against its pipeline's)
    GET  /health      liveness, no auth
    GET  /metrics     Prometheus text: requests, prompts, cache hits/misses, batch sizes, latency

Design choices:
- Micro-batching: requests go into an asyncio queue; one worker takes the first, waits `batch_window_s` for
  more, and encodes everything that fits in `max_batch_prompts` in one encoder call on a single worker thread.
  A request's prompts are never split across batches, and with every sequence padded to max_sequence_length
  a prompt's embedding does not depend on its batch neighbours.
- An LRU cache of per-prompt embeddings, keyed by (model id, prompt, max_sequence_length), bounded in bytes.
  Requests whose prompts are all cached skip the queue; the others only send their misses to the encoder.
- Everything on the event loop (cache, metrics, queue) is touched from that loop only, so there are no locks.
- A bearer token, when configured, is compared with `hmac.compare_digest`. /health stays open for probes.
- Bad input is a 4xx with `{"error": {"message", "type"}}` (OpenAI's shape); an encoder failure is a 500 for
  the requests in that batch and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError

from featherflux.errors import UserError
from featherflux.loading import build_family, component, resolve_model_path, variant_of
from featherflux.text_encoder import load_prompt_encoder
from featherflux.text_encoder.wire import MEDIA_TYPE, encode_embeddings

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # the FLUX.2 encoders' context; longer prompts are truncated by the tokenizer
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestError(Exception):
    """Bad input from a client; becomes a 4xx JSON answer."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


# --- metrics: the Prometheus text format is a few lines of code, not a dependency


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float):
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


@dataclass
class Metrics:
    requests: dict[int, int] = field(default_factory=dict)  # HTTP status -> count, for /v1/encode
    prompts: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    encoder_errors: int = 0
    batch_prompts: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    batch_requests: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    encode_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    def render(self, cache: PromptCache) -> str:
        p = "featherflux_encoder"
        lines = [f"# HELP {p}_requests_total /v1/encode answers by HTTP status", f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())]
        counters = {
            "prompts_total": (self.prompts, "prompts received in successful and failed requests"),
            "cache_hits_total": (self.cache_hits, "prompts answered from the embedding cache"),
            "cache_misses_total": (self.cache_misses, "prompts sent to the encoder"),
            "encoder_errors_total": (self.encoder_errors, "encoder calls that raised"),
        }
        for name, (value, help_text) in counters.items():
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
        gauges = {
            "cache_bytes": cache.nbytes,
            "cache_entries": len(cache.entries),
            "cache_capacity_bytes": cache.capacity,
        }
        for name, value in gauges.items():
            lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        histograms = {
            "batch_prompts": (self.batch_prompts, "prompts per encoder call"),
            "batch_requests": (self.batch_requests, "requests merged into one encoder call"),
            "request_seconds": (self.latency, "time from request to answer"),
            "encode_seconds": (self.encode_seconds, "time inside the encoder per call"),
        }
        for name, (hist, help_text) in histograms.items():
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} histogram", *hist.lines(f"{p}_{name}")]
        return "\n".join(lines) + "\n"


# --- cache


class PromptCache:
    """LRU map (model id, prompt, max_sequence_length) -> embedding (L, D), bounded by total tensor bytes."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.entries: OrderedDict[tuple[str, str, int], torch.Tensor] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[str, str, int]) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, str, int], value: torch.Tensor):
        size = value.numel() * value.element_size()
        if size > self.capacity or key in self.entries:
            return
        self.entries[key] = value
        self.nbytes += size
        while self.nbytes > self.capacity:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()


# --- batching


@dataclass
class _Job:
    prompts: list[str]  # distinct prompts not found in the cache
    max_sequence_length: int
    done: asyncio.Future  # -> dict prompt -> (L, D) tensor


class Batcher:
    """Gathers jobs that arrive together and runs them through the encoder in one call, on one thread."""

    def __init__(self, encoder, cache: PromptCache, metrics: Metrics, *, max_batch_prompts: int, window_s: float):
        self.encoder, self.cache, self.metrics = encoder, cache, metrics
        self.max_batch_prompts, self.window_s = max_batch_prompts, window_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        # One thread: the encoder runs one batch at a time, and the event loop stays free to accept requests.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-encoder")

    async def encode(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        job = _Job(prompts, max_sequence_length, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.done

    async def run(self):
        carry = None
        while True:
            batch = [carry or await self.queue.get()]
            carry = None
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            size = len(batch[0].prompts)
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if size + len(job.prompts) > self.max_batch_prompts:
                    carry = job
                    break
                batch.append(job)
                size += len(job.prompts)
            for length in sorted({job.max_sequence_length for job in batch}):
                await self._encode([job for job in batch if job.max_sequence_length == length], length)

    async def _encode(self, jobs: list[_Job], max_sequence_length: int):
        prompts = list(dict.fromkeys(p for job in jobs for p in job.prompts))  # distinct, in arrival order
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            embeds = await loop.run_in_executor(self.executor, self._run_encoder, prompts, max_sequence_length)
            # clone: a cached row must not pin the whole batch's storage (the cache counts bytes per row)
            by_prompt = {prompt: embeds[i].clone() for i, prompt in enumerate(prompts)}
        except Exception as e:
            log.exception("encoding %d prompts failed", len(prompts))
            self.metrics.encoder_errors += 1
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(e)
            return
        self.metrics.encode_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_prompts.observe(len(prompts))
        self.metrics.batch_requests.observe(len(jobs))
        for prompt, value in by_prompt.items():
            self.cache.put((self.encoder.model_id, prompt, max_sequence_length), value)
        for job in jobs:
            if not job.done.done():  # a client that went away cancelled its future
                job.done.set_result({p: by_prompt[p] for p in job.prompts})

    def _run_encoder(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        with torch.no_grad():
            embeds = self.encoder.encode(prompts, max_sequence_length=max_sequence_length)
        if embeds.ndim != 3 or tuple(embeds.shape[:2]) != (len(prompts), max_sequence_length):
            raise RuntimeError(
                f"encoder returned shape {tuple(embeds.shape)} for {len(prompts)} prompts at {max_sequence_length}"
            )
        return embeds.cpu()


# --- request parsing


@dataclass(frozen=True)
class Limits:
    max_prompts: int
    max_prompt_chars: int
    max_body_bytes: int
    max_sequence_length: int


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives, so a lying Content-Length cannot get past
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_encode_request(body: bytes, limits: Limits) -> tuple[list[str], int]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." bodies
        raise RequestError(400, f"request body is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, 'request body must be a JSON object like {"prompts": ["a cat"]}')
    unknown = set(payload) - {"prompts", "max_sequence_length"}
    if unknown:
        raise RequestError(400, f"unknown fields {sorted(unknown)}; allowed: prompts, max_sequence_length")
    prompts = payload.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, '"prompts" must be a list of strings')
    if not prompts:
        raise RequestError(400, '"prompts" is empty; send at least one prompt')
    if len(prompts) > limits.max_prompts:
        raise RequestError(413, f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts}")
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_chars:
        raise RequestError(413, f"a prompt has {longest} characters; the limit is {limits.max_prompt_chars}")
    length = payload.get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    if type(length) is not int or not 1 <= length <= limits.max_sequence_length:
        raise RequestError(400, f'"max_sequence_length" must be an integer in [1, {limits.max_sequence_length}]')
    return prompts, length


def parse_upsample_request(body: bytes, limits: Limits) -> tuple[list[str], float, int, list | None]:
    """(prompts, temperature, seed, pictures per prompt or None) of a POST /v1/upsample body."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"request body is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, 'request body must be a JSON object like {"prompts": ["a cat"], "seed": 0}')
    unknown = set(payload) - {"prompts", "temperature", "seed", "images"}
    if unknown:
        raise RequestError(400, f"unknown fields {sorted(unknown)}; allowed: prompts, temperature, seed, images")
    prompts = payload.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, '"prompts" must be a non-empty list of strings')
    if len(prompts) > limits.max_prompts or max(len(p) for p in prompts) > limits.max_prompt_chars:
        raise RequestError(413, f"at most {limits.max_prompts} prompts of {limits.max_prompt_chars} characters")
    temperature, seed = payload.get("temperature", 0.15), payload.get("seed", 0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise RequestError(400, '"temperature" must be a number > 0')
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise RequestError(400, '"seed" must be a non-negative integer')
    images = payload.get("images")
    if images is not None:
        if not isinstance(images, list) or len(images) != len(prompts):
            raise RequestError(400, '"images" must hold one list of base64 PNG pictures per prompt')
        try:
            images = [[Image.open(io.BytesIO(base64.b64decode(b, validate=True))) for b in group] for group in images]
            for group in images:
                for picture in group:
                    picture.load()
        except (TypeError, ValueError, OSError, UnidentifiedImageError) as e:
            raise RequestError(400, f'"images" must be base64 PNG or JPEG pictures ({e})') from None
    return prompts, float(temperature), seed, images


# --- the app


def create_encoder_app(
    encoder,
    *,
    token: str | None = None,
    max_prompts: int = 64,
    max_prompt_chars: int = 20_000,
    max_body_bytes: int = 1 << 20,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    max_batch_prompts: int = 32,
    batch_window_s: float = 0.005,
    cache_bytes: int = 1 << 30,
    metrics_public: bool = False,
    max_upsample_body_bytes: int = 16 << 20,
) -> FastAPI:
    """A FastAPI app serving `encoder` (anything with `encode(prompts, max_sequence_length)`, `model_id`, `family`).

    With a `token`, every endpoint but /health needs it; `metrics_public=True` opens /metrics for a Prometheus
    scraper that has no token."""
    limits = Limits(max_prompts, max_prompt_chars, max_body_bytes, max_sequence_length)
    cache = PromptCache(cache_bytes)
    metrics = Metrics()
    batcher = Batcher(encoder, cache, metrics, max_batch_prompts=max_batch_prompts, window_s=batch_window_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="featherflux encode-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cache, app.state.metrics = cache, metrics

    def check_token(request: Request):
        if token is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            raise RequestError(
                401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')", "authentication_error"
            )

    @app.post("/v1/encode")
    async def encode(request: Request) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            check_token(request)
            prompts, length = parse_encode_request(await _read_body(request, limits.max_body_bytes), limits)
            metrics.prompts += len(prompts)
            found, missing = {}, []
            for prompt in dict.fromkeys(prompts):
                cached = cache.get((encoder.model_id, prompt, length))
                if cached is None:
                    missing.append(prompt)
                else:
                    found[prompt] = cached
            metrics.cache_hits += len(prompts) - len(missing)
            metrics.cache_misses += len(missing)
            if missing:
                found.update(await batcher.encode(missing, length))
            body = encode_embeddings(
                torch.stack([found[p] for p in prompts]),
                model_id=encoder.model_id,
                family=encoder.family,
                max_sequence_length=length,
            )
            status = 200
            return Response(body, media_type=MEDIA_TYPE)
        except RequestError as e:
            status = e.status
            return _error(e.status, e.message, e.kind)
        except Exception as e:
            log.exception("POST /v1/encode failed")
            return _error(500, f"encoding failed: {type(e).__name__}: {e}", "server_error")
        finally:
            metrics.requests[status] = metrics.requests.get(status, 0) + 1
            metrics.latency.observe(time.perf_counter() - start)

    @app.post("/v1/upsample")
    async def upsample(request: Request) -> Response:
        """Caption upsampling on the encoder's whole model, one request at a time on the encoder's thread; the
        client's seed makes it repeatable."""
        try:
            check_token(request)
            body = await _read_body(request, max_upsample_body_bytes)
            prompts, temperature, seed, images = parse_upsample_request(body, limits)
            if not hasattr(encoder, "upsample"):
                raise RequestError(400, f"this server's encoder ({encoder.family}) cannot upsample captions")
        except RequestError as e:
            return _error(e.status, e.message, e.kind)

        def run() -> list[str]:
            with torch.random.fork_rng(devices=[]):  # the server's own RNG stays where it was
                torch.manual_seed(seed)
                return encoder.upsample(prompts, images, temperature)

        try:
            written = await asyncio.get_running_loop().run_in_executor(batcher.executor, run)
        except UserError as e:
            return _error(400, str(e), "invalid_request_error")
        except Exception as e:
            log.exception("POST /v1/upsample failed")
            return _error(500, f"upsampling failed: {type(e).__name__}: {e}", "server_error")
        return JSONResponse({"prompts": written})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            check_token(request)
        except RequestError as e:
            return _error(e.status, e.message, e.kind)
        info = {
            "id": encoder.model_id,
            "object": "model",
            "family": encoder.family,
            "max_prompts": limits.max_prompts,
            "max_sequence_length": limits.max_sequence_length,
        }
        return JSONResponse({"object": "list", "data": [info]})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        try:
            if not metrics_public:
                check_token(request)
        except RequestError as e:
            return _error(e.status, e.message, e.kind)
        return PlainTextResponse(metrics.render(cache), media_type="text/plain; version=0.0.4")

    return app


def load_pipeline_prompt_encoder(
    path_or_repo_id: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    out_layers=None,
    download: bool = False,
    revision: str | None = None,
):
    """The prompt encoder of a pipeline folder (or hub repo id) and nothing else: the family, stacked layers and
    model id are worked out as `load_pipeline` does, from configs only; transformer and VAE weights are neither read
    nor, with `download=True`, downloaded."""
    folder, model_id = resolve_model_path(
        path_or_repo_id, download_missing=download, revision=revision, skip={"transformer", "vae"}
    )
    family = build_family(folder, variant_of(folder), out_layers)
    return load_prompt_encoder(
        component(folder, "text_encoder"),
        component(folder, "tokenizer"),
        out_layers=family.text_encoder.out_layers,
        family=family.name,
        model_id=model_id,
        device=device,
        dtype=dtype,
    )


def run_encoder_server(encoder, *, host: str = "127.0.0.1", port: int = 8700, token: str | None = None, **limits):
    """Serve `encoder` with uvicorn until interrupted."""
    uvicorn.run(create_encoder_app(encoder, token=token, **limits), host=host, port=port, log_level="info")
