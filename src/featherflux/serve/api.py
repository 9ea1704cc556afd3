"""The image service: OpenAI's images API, a jobs API with server-sent progress, metrics, and a web page.

Design choices:
- The wire format is OpenAI's (`/v1/images/generations`, `/v1/images/edits`, errors as
  `{"error": {"message", "type", "param", "code"}}`), so the official `openai` client works unchanged; our
  extensions (`seed`, `steps`, `guidance`, `loras`) ride in the same body (`extra_body=` in that client).
- Every request becomes a job in one `JobQueue`; the OpenAI endpoints submit a job and wait for it, the jobs API
  returns its id at once. Both accept JSON or multipart (reference images as `image` / `image[]` parts).
- Validation happens before a job is queued, so a bad request costs no GPU time and always gets a 4xx that says
  what to change; a failure while generating fails only that job (5xx for it). Defaults and the size rule are the
  pipeline's own (`featherflux.request`): a size that is not a multiple of 16 is floored, and the response's
  `size` says what was made.
- The routes share one `ServerState` (the queue, the keys, the limits), kept on `app.state.server`.
- Stored images have generated names; `/v1/files/{name}` only serves names of that form (see `files.py`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from featherflux.errors import UserError
from featherflux.images import reference_size
from featherflux.request import Defaults, defaults, floor_size, size_multiple
from featherflux.serve import files
from featherflux.serve.auth import RateLimiter, find_key, read_keys
from featherflux.serve.metrics import prometheus_text
from featherflux.serve.queue import FINISHED, Job, JobQueue, JobSpec, QueueFull, ShuttingDown

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server; the size rule is the pipeline's (`featherflux.request`)."""

    max_n: int = 4
    max_steps: int = 100
    max_references: int = 4  # uploads per request, each up to max_upload_bytes
    max_upload_bytes: int = 10 * 1024 * 1024
    max_prompt_chars: int = 4000


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
    strength: float | None = None  # inpainting: with a mask, or alone for image-to-image of the first image
    upsample: bool | float = False  # dev's caption upsampling: true (temperature 0.15) or a temperature
    loras: list[str | LoraRef] = []


@dataclass(frozen=True)
class Uploads:
    """The pictures of a request, stored (see files.save_upload) before it becomes a job."""

    references: list[str]  # upload names; with a mask or a strength the first is the picture to repaint
    mask: str | None
    first_size: tuple[int, int] | None  # the output size the first picture gives when the request names none

    @property
    def names(self) -> list[str]:
        return self.references + ([self.mask] if self.mask else [])


def _parse_size(size: str | None) -> tuple[int, int] | None:
    """ "WIDTHxHEIGHT" -> (width, height) as asked; None for no size or "auto"."""
    if size is None or size == "auto":
        return None
    try:
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT, for example '1024x1024'", param="size") from None
    return width, height


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


def _shutting_down(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="shutting_down", headers={"Retry-After": "5"})


@dataclass
class ServerState:
    """What every route needs: the queue in front of the pipeline, who may ask, and what they may ask for."""

    queue: JobQueue
    output_dir: Path
    keys: dict[str, str] | None  # name -> sha256 of the key; None: an open server
    limiter: RateLimiter
    limits: Limits
    loras: dict[str, Path]
    defaults: Defaults  # the pipeline family's steps, guidance and side
    size_multiple: int  # the pipeline family's size rule
    model: str | None = None  # the pipeline's model id
    metrics_public: bool = False  # /metrics without a key, for a Prometheus scraper

    # ---- who is asking ----------------------------------------------------------------------------------------

    def owner_of(self, request: Request) -> str:
        if self.keys is None:
            return request.client.host if request.client else "local"
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "no API key; send the header `Authorization: Bearer <key>`", code="missing_api_key")
        name = find_key(self.keys, key.strip())
        if name is None:
            raise ApiError(
                401, "incorrect API key; make one with `featherflux keys add NAME --file KEYS`", code="invalid_api_key"
            )
        return name

    def submitter(self, request: Request) -> str:
        """The owner of a request that creates a job, after its rate limit (limits are per key; an open server
        has none)."""
        owner = self.owner_of(request)
        wait = self.limiter.take(owner) if self.keys is not None else 0.0
        if wait:
            raise ApiError(
                429,
                f"rate limit for this key reached; retry in {math.ceil(wait)} s",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        return owner

    # ---- requests into jobs -------------------------------------------------------------------------------------

    async def read_request(self, request: Request) -> tuple[ImageParams, Uploads]:
        """Parse JSON or multipart into params and the stored pictures (references, an OpenAI-style mask)."""
        limits = self.limits
        content_type = request.headers.get("content-type", "")
        uploads, body, mask_upload = [], {}, None
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
            form = await request.form(max_files=limits.max_references + 2)
            for key, value in form.multi_items():
                if key in ("image", "image[]"):
                    if isinstance(value, str):
                        raise ApiError(400, "image must be an uploaded file, not a text field", param="image")
                    uploads.append(value)
                elif key == "mask":
                    if isinstance(value, str):
                        raise ApiError(400, "mask must be an uploaded file, not a text field", param="mask")
                    mask_upload = value
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
        mask = None
        if mask_upload is not None:
            if not images:
                raise ApiError(400, "a mask marks what to repaint in the first `image`; send that image", param="mask")
            if mask_upload.size is not None and mask_upload.size > limits.max_upload_bytes:
                raise ApiError(
                    413,
                    f"the mask is {mask_upload.size} bytes; send at most {limits.max_upload_bytes}",
                    param="mask",
                    code="upload_too_large",
                )
            try:
                mask = files.decode_mask(await mask_upload.read())
            except UserError as e:
                raise ApiError(400, str(e), param="mask", code="invalid_image") from None
            if not mask.getbbox():
                raise ApiError(400, "the mask marks nothing to repaint (no transparent pixels)", param="mask")
        first_size = reference_size(*images[0].size, self.size_multiple) if images else None
        references = [await asyncio.to_thread(files.save_upload, self.output_dir, image) for image in images]
        mask_name = await asyncio.to_thread(files.save_upload, self.output_dir, mask) if mask is not None else None
        return params, Uploads(references, mask_name, first_size)

    def job_spec(self, params: ImageParams, uploads: Uploads) -> JobSpec:
        limits = self.limits
        if len(params.prompt) > limits.max_prompt_chars:
            raise ApiError(
                400,
                f"prompt has {len(params.prompt)} characters; send at most {limits.max_prompt_chars}",
                param="prompt",
            )
        if not 1 <= params.n <= limits.max_n:
            raise ApiError(400, f"n={params.n}; ask for 1 to {limits.max_n} images per request", param="n")
        steps = self.defaults.steps if params.steps is None else params.steps
        if not 1 <= steps <= limits.max_steps:
            raise ApiError(400, f"steps={steps}; use 1 to {limits.max_steps}", param="steps")
        guidance = self.defaults.guidance if params.guidance is None else params.guidance
        if not 0.0 <= guidance <= 30.0:
            raise ApiError(400, f"guidance={guidance}; use 0 to 30", param="guidance")
        if params.strength is not None and not 0.0 <= params.strength <= 1.0:
            raise ApiError(400, f"strength={params.strength}; use 0 to 1", param="strength")
        if params.strength is not None and not uploads.references:
            raise ApiError(400, "strength repaints the first `image`; send that image", param="strength")
        upsample = 0.15 if params.upsample is True else (params.upsample or None)
        if upsample is not None and not upsample > 0:
            raise ApiError(400, f"upsample={params.upsample}; use true or a temperature > 0", param="upsample")
        default_side = (self.defaults.side, self.defaults.side)
        width, height = _parse_size(params.size) or uploads.first_size or default_side
        try:
            height, width = floor_size(height, width, self.size_multiple)
        except UserError as e:
            raise ApiError(400, str(e), param="size") from None
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
            references=tuple(uploads.references),
            loras=_loras(params.loras, self.loras),
            mask=uploads.mask,
            strength=params.strength,
            upsample=upsample,
        )

    def submit(self, owner: str, params: ImageParams, uploads: Uploads) -> Job:
        try:
            return self._enqueue(owner, self.job_spec(params, uploads))
        except ApiError:
            files.delete_uploads(self.output_dir, uploads.names)  # the job was not accepted: nothing will read them
            raise

    def _enqueue(self, owner: str, spec: JobSpec) -> Job:
        try:
            return self.queue.submit(owner, spec)
        except QueueFull as e:
            raise ApiError(
                429,
                f"{e}; the server holds at most {self.queue.max_queue} waiting jobs",
                type="requests",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ShuttingDown:
            raise _shutting_down("the server is shutting down; retry in a few seconds") from None

    def owned_job(self, job_id: str, owner: str) -> Job:
        job = self.queue.get(job_id)
        if job is None or job.owner != owner:
            raise ApiError(404, f"no job {job_id!r}", param="id", code="job_not_found")
        return job

    # ---- waiting and answering ----------------------------------------------------------------------------------

    def events_of(self, job: Job) -> tuple[asyncio.Queue, Callable[[], None]]:
        """An asyncio queue that receives the job's events from the worker thread, and its unsubscribe."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        unsubscribe = self.queue.subscribe(job.id, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        return events, unsubscribe

    async def wait_for(self, request: Request, job: Job) -> Job:
        """Wait for the job to finish; a client that goes away cancels it."""
        events, unsubscribe = self.events_of(job)
        try:
            while job.state not in FINISHED:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.queue.cancel(job.id)
                        raise ApiError(499, "client closed the request") from None
                    continue
                if event["event"] == "shutdown":
                    raise _shutting_down(
                        f"the server is shutting down; job {job.id} was saved and runs after the restart "
                        "(GET /v1/jobs/{id})"
                    )
        finally:
            unsubscribe()
        return job

    def openai_result(self, request: Request, job: Job, response_format: str) -> dict:
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
                path = files.output_path(self.output_dir, name)
                data.append({"b64_json": base64.b64encode(path.read_bytes()).decode()})
        return {
            "created": int(job.created),
            "data": data,
            "output_format": "png",
            "size": f"{job.spec.width}x{job.spec.height}",  # as made: a size not a multiple of 16 was floored
        }


# ---- routes ---------------------------------------------------------------------------------------------------

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _openai_call(request: Request, *, edit: bool) -> dict:
    state = _state(request)
    owner = state.submitter(request)
    params, uploads = await state.read_request(request)
    if edit and not uploads.references:
        raise ApiError(400, "an edit needs at least one reference image as an `image` file part", param="image")
    job = state.submit(owner, params, uploads)
    return state.openai_result(request, await state.wait_for(request, job), params.response_format or "b64_json")


@router.post("/v1/images/generations")
async def generations(request: Request):
    return await _openai_call(request, edit=False)


@router.post("/v1/images/edits")
async def edits(request: Request):
    return await _openai_call(request, edit=True)


@router.post("/v1/jobs", status_code=202)
async def create_job(request: Request):
    state = _state(request)
    owner = state.submitter(request)
    params, uploads = await state.read_request(request)
    return state.submit(owner, params, uploads).public()


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request):
    state = _state(request)
    return state.owned_job(job_id, state.owner_of(request)).public()


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    state = _state(request)
    state.owned_job(job_id, state.owner_of(request))
    return state.queue.cancel(job_id).public()


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request):
    state = _state(request)
    job = state.owned_job(job_id, state.owner_of(request))
    events, unsubscribe = state.events_of(job)

    async def stream():
        try:
            event = {"event": "done" if job.state in FINISHED else job.state} | job.public()
            while True:
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                if event["event"] in ("done", "shutdown"):
                    return
                event = await events.get() if state.queue.accepting else {"event": "shutdown", "id": job.id}
        finally:
            unsubscribe()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/v1/files/{name}")
async def get_file(name: str, request: Request):
    path = files.output_path(_state(request).output_dir, name)
    if path is None:
        raise ApiError(404, f"no stored image named {name!r}", param="name", code="file_not_found")
    return FileResponse(path, media_type="image/png")


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    side = state.defaults.side
    # a pipeline split over processes (serve.ranks) turns unhealthy when one of them is gone: it needs a restart
    if not getattr(state.queue.pipeline, "healthy", True):
        return JSONResponse({"status": "unhealthy", "model": state.model}, status_code=503)
    return {
        "status": "ok" if state.queue.accepting else "shutting_down",
        "queue_depth": state.queue.depth(),
        "jobs": state.queue.counts(),
        "model": state.model,
        "defaults": {
            "size": f"{side}x{side}",
            "steps": state.defaults.steps,
            "guidance": state.defaults.guidance,
            "max_n": state.limits.max_n,
            "max_steps": state.limits.max_steps,
        },
    }


@router.get("/metrics")
async def metrics(request: Request):
    state = _state(request)
    if not state.metrics_public:
        state.owner_of(request)  # behind the API keys when the server has keys, like every other endpoint
    return PlainTextResponse(prometheus_text(state.queue), media_type="text/plain; version=0.0.4")


@router.get("/")
async def page():
    return HTMLResponse((STATIC / "index.html").read_text())


# ---- the app --------------------------------------------------------------------------------------------------


async def _api_error(request: Request, e: ApiError):
    return _error(e.status, e.message, param=e.param, code=e.code, type=e.type, headers=e.headers)


async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0]
    return _error(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param=str(first["loc"][-1]))


async def _http_error(request: Request, e: StarletteHTTPException):
    return _error(e.status_code, str(e.detail), type="invalid_request_error")


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
    metrics_public: bool = False,
) -> FastAPI:
    """The FastAPI app serving `pipeline` (anything called with diffusers' keyword names).

    `api_keys` is a keys file (see `auth.py`); without one every client is let in and clients are told apart
    by address. `rate_limit` is (requests per minute, burst) per API key for requests that create jobs.
    `loras` maps LoRA names a request may ask for to adapter files; applying them needs `pipeline.set_loras`.
    With keys, /metrics needs one too unless `metrics_public`.
    """
    output_dir = Path(output_dir)
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
    family = getattr(pipeline, "family", None)
    state = ServerState(
        queue=queue,
        output_dir=output_dir,
        keys=read_keys(api_keys) if api_keys is not None else None,
        limiter=RateLimiter(*rate_limit),
        limits=limits,
        loras=loras,
        defaults=defaults(family),
        size_multiple=size_multiple(family),
        model=getattr(pipeline, "model_id", None),
        metrics_public=metrics_public,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        await asyncio.to_thread(queue.close, drain_seconds)

    app = FastAPI(title="featherflux", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.state.queue = queue
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    return app


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
