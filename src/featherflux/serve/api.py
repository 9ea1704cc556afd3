"""The image service: OpenAI's images API, a jobs API with server-sent progress, metrics, and a web page.

Design choices:
- The wire format is OpenAI's (`/v1/images/generations`, `/v1/images/edits`, errors as
  `{"error": {"message", "type", "param", "code"}}`), so the official `openai` client works unchanged; our
  extensions (`seed`, `steps`, `guidance`, `loras`) ride in the same body (`extra_body=` in that client).
- Every request becomes a job in one `JobQueue`; the OpenAI endpoints submit a job and wait for it, the jobs API
  returns its id at once. Both accept JSON or multipart (reference images as `image` / `image[]` parts).
- Validation happens before a job is queued, so a bad request costs no GPU time and always gets a 4xx that says
  what to change; a failure while generating fails only that job (5xx for it).
- Stored images have generated names; `/v1/files/{name}` only serves names of that form (see `files.py`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from featherflux.errors import UserError
from featherflux.pipeline import DEFAULT_SIZES, MAX_PIXELS, MIN_SIDE
from featherflux.serve import files
from featherflux.serve.auth import RateLimiter, find_key, read_keys
from featherflux.serve.queue import FINISHED, STEP_BUCKETS, JobQueue, JobSpec, QueueFull, ShuttingDown

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    max_n: int = 4
    max_steps: int = 100
    min_side: int = MIN_SIDE  # the pipeline's own size rules, checked before a job is queued
    max_pixels: int = MAX_PIXELS
    max_references: int = 4
    max_upload_bytes: int = 10 * 1024 * 1024
    max_prompt_chars: int = 4000
    reference_area: int = 1024 * 1024  # an edit without `size` takes the first reference's size, shrunk to this


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def _error(status: int, message: str, *, param=None, code=None, type="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class LoraRef(BaseModel):
    name: str
    scale: float = 1.0


class ImageParams(BaseModel):
    """The body of a generation, edit or job request; OpenAI fields we do not use (model, quality...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    loras: list[str | LoraRef] = []


def _parse_size(size: str | None, limits: Limits) -> tuple[int, int] | None:
    if size is None or size == "auto":
        return None
    try:
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT, for example '1024x1024'", param="size") from None
    if min(width, height) < limits.min_side or width * height > limits.max_pixels or width % 16 or height % 16:
        raise ApiError(
            400,
            f"size {size!r}: width and height must be multiples of 16, at least {limits.min_side}, "
            f"and width x height at most {limits.max_pixels} pixels",
            param="size",
        )
    return width, height


def _reference_size(image, limits: Limits) -> tuple[int, int]:
    scale = min(1.0, math.sqrt(limits.reference_area / (image.width * image.height)))
    return max(16, int(image.width * scale) // 16 * 16), max(16, int(image.height * scale) // 16 * 16)


def _loras(items: list, known: dict[str, Path]) -> tuple[tuple[str, float], ...]:
    refs = []
    for item in items:
        if isinstance(item, str):  # "name" or "name:scale" (what a multipart form can carry)
            name, _, scale = item.partition(":")
            try:
                item = LoraRef(name=name, scale=float(scale) if scale else 1.0)
            except ValueError:
                raise ApiError(400, f"LoRA {item!r}: the scale after ':' must be a number", param="loras") from None
        if item.name not in known:
            names = ", ".join(sorted(known)) or "none are loaded (start the server with --lora-dir)"
            raise ApiError(400, f"unknown LoRA {item.name!r}; available: {names}", param="loras", code="unknown_lora")
        refs.append((item.name, item.scale))
    return tuple(refs)


def create_app(
    pipeline,
    *,
    api_keys: Path | None = None,
    max_queue: int = 64,
    output_dir: Path = Path("featherflux-outputs"),
    max_batch: int = 4,
    job_timeout: float = 600.0,
    rate_limit: tuple[float, int] = (120.0, 30),
    loras: dict[str, Path] | None = None,
    limits: Limits = Limits(),
    drain_seconds: float = 30.0,
    state_file: Path | None = None,
) -> FastAPI:
    """The FastAPI app serving `pipeline` (anything called with diffusers' keyword names).

    `api_keys` is a keys file (see `auth.py`); without one every client is let in and clients are told apart
    by address. `rate_limit` is (requests per minute, burst) per API key for requests that create jobs.
    `loras` maps LoRA names a request may ask for to adapter files; applying them needs `pipeline.set_loras`.
    """
    output_dir = Path(output_dir)
    family = getattr(pipeline, "family", None)
    default_steps = getattr(family, "default_steps", 28)
    default_guidance = getattr(family, "default_guidance", 4.0)
    default_side = DEFAULT_SIZES.get(getattr(family, "name", None), 1024)
    keys = read_keys(api_keys) if api_keys is not None else None
    limiter = RateLimiter(*rate_limit)
    loras = dict(loras or {})
    set_loras = None
    if loras:
        if not hasattr(pipeline, "set_loras"):
            raise UserError("this pipeline cannot switch LoRAs per request (no set_loras); start without --lora-dir")

        def set_loras(pipe, wanted: tuple[tuple[str, float], ...]) -> None:
            pipe.set_loras({name: (loras[name], scale) for name, scale in wanted})

    queue = JobQueue(
        pipeline,
        output_dir=output_dir,
        state_file=state_file,
        max_queue=max_queue,
        max_batch=max_batch,
        job_timeout=job_timeout,
        set_loras=set_loras,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        await asyncio.to_thread(queue.close, drain_seconds)

    app = FastAPI(title="featherflux", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.queue = queue

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, param=e.param, code=e.code, type=e.type, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        return _error(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param=str(first["loc"][-1]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), type="invalid_request_error")

    # ---- who is asking ----------------------------------------------------------------------------------

    def owner_of(request: Request) -> str:
        if keys is None:
            return request.client.host if request.client else "local"
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "no API key; send the header `Authorization: Bearer <key>`", code="missing_api_key")
        name = find_key(keys, key.strip())
        if name is None:
            raise ApiError(
                401, "incorrect API key; make one with `featherflux keys add NAME --file KEYS`", code="invalid_api_key"
            )
        return name

    def submitter(request: Request) -> str:
        owner = owner_of(request)
        wait = limiter.take(owner) if keys is not None else 0.0  # limits are per key; an open server has none
        if wait:
            raise ApiError(
                429,
                f"rate limit for this key reached; retry in {math.ceil(wait)} s",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        return owner

    # ---- requests into jobs -----------------------------------------------------------------------------

    async def read_request(request: Request) -> tuple[ImageParams, list[str], tuple[int, int] | None]:
        """Parse JSON or multipart into params, stored reference names and the first reference's size."""
        content_type = request.headers.get("content-type", "")
        uploads, body = [], {}
        if content_type.startswith("multipart/form-data"):
            length = int(request.headers.get("content-length") or 0)
            if length > limits.max_upload_bytes * limits.max_references + 1024 * 1024:
                raise ApiError(
                    413,
                    f"request is {length} bytes; send at most {limits.max_references} images of "
                    f"{limits.max_upload_bytes} bytes each",
                    param="image",
                    code="upload_too_large",
                )
            form = await request.form(max_files=limits.max_references + 1)
            for key, value in form.multi_items():
                if key in ("image", "image[]"):
                    if isinstance(value, str):
                        raise ApiError(400, "image must be an uploaded file, not a text field", param="image")
                    uploads.append(value)
                elif key in ("loras", "loras[]"):
                    body.setdefault("loras", []).append(value)
                else:
                    body[key] = value
        else:
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the body is not JSON; send application/json or multipart/form-data") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object")
        try:
            params = ImageParams.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(
                400,
                f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}",
                param=str(first["loc"][0]) if first["loc"] else None,
            ) from None
        if len(uploads) > limits.max_references:
            raise ApiError(400, f"{len(uploads)} reference images; send at most {limits.max_references}", param="image")
        images = []  # all decoded and checked before any is stored
        for i, upload in enumerate(uploads):
            if upload.size is not None and upload.size > limits.max_upload_bytes:
                raise ApiError(
                    413,
                    f"image {i + 1} is {upload.size} bytes; send at most {limits.max_upload_bytes}",
                    param="image",
                    code="upload_too_large",
                )
            try:
                images.append(files.decode_upload(await upload.read(), what=f"image {i + 1} ({upload.filename})"))
            except UserError as e:
                raise ApiError(400, str(e), param="image", code="invalid_image") from None
        first_size = _reference_size(images[0], limits) if images else None
        references = [await asyncio.to_thread(files.save_upload, output_dir, image) for image in images]
        return params, references, first_size

    def job_spec(params: ImageParams, references: list[str], reference_size) -> JobSpec:
        if len(params.prompt) > limits.max_prompt_chars:
            raise ApiError(
                400,
                f"prompt has {len(params.prompt)} characters; send at most {limits.max_prompt_chars}",
                param="prompt",
            )
        if not 1 <= params.n <= limits.max_n:
            raise ApiError(400, f"n={params.n}; ask for 1 to {limits.max_n} images per request", param="n")
        steps = default_steps if params.steps is None else params.steps
        if not 1 <= steps <= limits.max_steps:
            raise ApiError(400, f"steps={steps}; use 1 to {limits.max_steps}", param="steps")
        guidance = default_guidance if params.guidance is None else params.guidance
        if not 0.0 <= guidance <= 30.0:
            raise ApiError(400, f"guidance={guidance}; use 0 to 30", param="guidance")
        width, height = _parse_size(params.size, limits) or reference_size or (default_side, default_side)
        seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
        if not 0 <= seed < 2**63 - limits.max_n:
            raise ApiError(400, f"seed={seed}; use 0 to 2**63 - {limits.max_n + 1}", param="seed")
        return JobSpec(
            prompt=params.prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            n=params.n,
            references=tuple(references),
            loras=_loras(params.loras, loras),
        )

    def submit(owner: str, params: ImageParams, references: list[str], reference_size):
        try:
            return enqueue(owner, job_spec(params, references, reference_size))
        except ApiError:
            files.delete_uploads(output_dir, references)  # the job was not accepted: nothing will read them
            raise

    def enqueue(owner: str, spec: JobSpec):
        try:
            return queue.submit(owner, spec)
        except QueueFull as e:
            raise ApiError(
                429,
                f"{e}; the server holds at most {queue.max_queue} waiting jobs",
                type="requests",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ShuttingDown:
            raise ApiError(
                503,
                "the server is shutting down; retry in a few seconds",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "5"},
            ) from None

    def owned_job(job_id: str, owner: str):
        job = queue.get(job_id)
        if job is None or job.owner != owner:
            raise ApiError(404, f"no job {job_id!r}", param="id", code="job_not_found")
        return job

    async def wait_for(request: Request, job):
        """Wait for the job to finish; a client that goes away cancels it."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        unsubscribe = queue.subscribe(job.id, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            while job.state not in FINISHED:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        queue.cancel(job.id)
                        raise ApiError(499, "client closed the request") from None
                    continue
                if event["event"] == "shutdown":
                    raise ApiError(
                        503,
                        f"the server is shutting down; job {job.id} was saved and runs after the "
                        "restart (GET /v1/jobs/{id})",
                        type="server_error",
                        code="shutting_down",
                        headers={"Retry-After": "5"},
                    )
        finally:
            unsubscribe()
        return job

    def openai_result(request: Request, job, response_format: str):
        if job.state == "cancelled":
            raise ApiError(409, f"job {job.id} was cancelled", code="cancelled")
        if job.state == "failed":
            kind = "invalid_request_error" if job.status < 500 else "server_error"
            raise ApiError(job.status, job.error, type=kind, code="generation_failed")
        data = []
        for name in job.files:
            if response_format == "url":
                data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/files/{name}"})
            else:
                data.append({"b64_json": base64.b64encode(files.output_path(output_dir, name).read_bytes()).decode()})
        return {
            "created": int(job.created),
            "data": data,
            "output_format": "png",
            "size": f"{job.spec.width}x{job.spec.height}",
        }

    # ---- endpoints --------------------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        owner = submitter(request)
        params, references, reference_size = await read_request(request)
        job = submit(owner, params, references, reference_size)
        return openai_result(request, await wait_for(request, job), params.response_format or "b64_json")

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        owner = submitter(request)
        params, references, reference_size = await read_request(request)
        if not references:
            raise ApiError(400, "an edit needs at least one reference image as an `image` file part", param="image")
        job = submit(owner, params, references, reference_size)
        return openai_result(request, await wait_for(request, job), params.response_format or "b64_json")

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        owner = submitter(request)
        params, references, reference_size = await read_request(request)
        return submit(owner, params, references, reference_size).public()

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        return owned_job(job_id, owner_of(request)).public()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        owned_job(job_id, owner_of(request))
        return queue.cancel(job_id).public()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = owned_job(job_id, owner_of(request))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        unsubscribe = queue.subscribe(job.id, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))

        async def stream():
            try:
                event = {"event": "done" if job.state in FINISHED else job.state} | job.public()
                while True:
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                    if event["event"] in ("done", "shutdown"):
                        return
                    event = await events.get() if queue.accepting else {"event": "shutdown", "id": job.id}
            finally:
                unsubscribe()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/files/{name}")
    async def get_file(name: str):
        path = files.output_path(output_dir, name)
        if path is None:
            raise ApiError(404, f"no stored image named {name!r}", param="name", code="file_not_found")
        return FileResponse(path, media_type="image/png")

    @app.get("/health")
    async def health():
        return {
            "status": "ok" if queue.accepting else "shutting_down",
            "queue_depth": queue.depth(),
            "jobs": queue.counts(),
            "model": getattr(pipeline, "model_id", None),
            "defaults": {
                "size": f"{default_side}x{default_side}",
                "steps": default_steps,
                "guidance": default_guidance,
                "max_n": limits.max_n,
                "max_steps": limits.max_steps,
            },
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(queue), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text())

    return app


def prometheus_text(queue: JobQueue) -> str:
    m = queue.metrics
    lines = [
        "# HELP featherflux_queue_depth Jobs waiting to run.",
        "# TYPE featherflux_queue_depth gauge",
        f"featherflux_queue_depth {queue.depth()}",
        "# HELP featherflux_jobs Jobs the server knows, by state.",
        "# TYPE featherflux_jobs gauge",
    ]
    lines += [f'featherflux_jobs{{state="{state}"}} {count}' for state, count in queue.counts().items()]
    lines += [
        "# HELP featherflux_step_seconds Wall time of one denoising step (whole batch).",
        "# TYPE featherflux_step_seconds histogram",
    ]
    lines += [f'featherflux_step_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(STEP_BUCKETS, m.step_buckets)]
    lines += [
        f'featherflux_step_seconds_bucket{{le="+Inf"}} {m.step_count}',
        f"featherflux_step_seconds_sum {m.step_sum:.6f}",
        f"featherflux_step_seconds_count {m.step_count}",
        "# HELP featherflux_images_total Images generated.",
        "# TYPE featherflux_images_total counter",
        f"featherflux_images_total {m.images_total}",
        "# HELP featherflux_images_per_second Images generated per second over the last minute.",
        "# TYPE featherflux_images_per_second gauge",
        f"featherflux_images_per_second {m.images_per_second():.4f}",
    ]
    if torch.cuda.is_available():
        lines += [
            "# HELP featherflux_device_memory_bytes CUDA memory held by PyTorch.",
            "# TYPE featherflux_device_memory_bytes gauge",
        ]
        for i in range(torch.cuda.device_count()):
            for kind, value in (
                ("allocated", torch.cuda.memory_allocated(i)),
                ("reserved", torch.cuda.memory_reserved(i)),
                ("peak_allocated", torch.cuda.max_memory_allocated(i)),
            ):
                lines.append(f'featherflux_device_memory_bytes{{device="cuda:{i}",kind="{kind}"}} {value}')
    return "\n".join(lines) + "\n"


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT first stops the queue taking jobs and ends open event streams,
    so uvicorn's wait for open connections is short and the queue can drain (see `JobQueue.close`)."""

    def __init__(self, config: uvicorn.Config, queue: JobQueue):
        super().__init__(config)
        self.queue = queue

    def handle_exit(self, sig, frame) -> None:
        self.queue.stop_accepting()
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8800) -> None:
    """Serve `app` until SIGTERM/SIGINT; unfinished jobs are then finished or saved for the next start."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5, log_level="info")
    _Server(config, app.state.queue).run()
