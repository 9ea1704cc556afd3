"""A bounded, fair, durable job queue in front of one pipeline, driven by one worker thread.

Design choices:
- Fair: every owner (API key name) has its own FIFO and owners are served round-robin, so one client's burst
  cannot starve the others.
- Bounded: at most `max_queue` jobs wait; past that `submit` raises `QueueFull` with a retry-after estimate.
- Batched: jobs with the same size, steps, guidance and LoRAs and no reference images run as one pipeline call
  with one `torch.Generator` per image, so each image depends only on its own seed, not on its batch-mates.
- Durable: every job is a line in a JSON-lines file, atomically rewritten whenever a job changes state. A new
  queue on the same file resumes the unfinished jobs under their old ids and still answers for finished ones.
- Interruptible at step boundaries: cancellation, the per-job time limit and shutdown are checked in
  `callback_on_step_end`; the call stops early only when no job in the batch still wants its images.
- Observable: listeners get an event dict per state change and per step; counters feed `/metrics`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featherflux.errors import UserError
from featherflux.serve import files

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
STATES = ("queued", "running", *FINISHED)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server stopped taking jobs because it is shutting down."""


class _Stop(Exception):
    """Raised from the step callback to end a pipeline call that nobody waits for any more."""


@dataclass(frozen=True)
class JobSpec:
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    n: int = 1
    references: tuple[str, ...] = ()  # upload names (files.save_upload)
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one forward pass; reference images make a job run alone."""
        if self.references:
            return None
        return (self.width, self.height, self.steps, self.guidance, self.loras)

    def parameters(self, index: int) -> dict:
        return {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "seed": self.seed + index,
            "loras": [list(x) for x in self.loras],
            "references": len(self.references),
        }


@dataclass
class Job:
    id: str
    owner: str
    spec: JobSpec
    state: str = "queued"
    step: int = 0
    files: list[str] = field(default_factory=list)
    error: str | None = None
    status: int | None = None  # HTTP status of a failure: 400 user error, 500 internal, 504 time limit
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False  # not persisted: a restart forgets a cancel that had not taken effect

    def public(self) -> dict:
        return {
            "id": self.id,
            "object": "job",
            "state": self.state,
            "step": self.step,
            "steps": self.spec.steps,
            "progress": round(self.step / self.spec.steps, 4),
            "files": list(self.files),
            "error": self.error,
            "status": self.status,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "parameters": self.spec.parameters(0) | {"n": self.spec.n},
        }

    def record(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cancel_requested")
        return d

    @staticmethod
    def from_record(d: dict) -> Job:
        spec = d.pop("spec")
        spec = JobSpec(
            **spec | {"references": tuple(spec["references"]), "loras": tuple((n, float(s)) for n, s in spec["loras"])}
        )
        return Job(spec=spec, **d)


@dataclass
class Metrics:
    step_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))
    step_count: int = 0
    step_sum: float = 0.0
    images_total: int = 0
    image_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    call_seconds: float = 10.0  # running average of seconds per pipeline call, for Retry-After

    def observe_step(self, seconds: float) -> None:
        self.step_count += 1
        self.step_sum += seconds
        for i, bound in enumerate(STEP_BUCKETS):
            if seconds <= bound:
                self.step_buckets[i] += 1

    def images_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.image_times if now - t <= window]
        return len(recent) / window


class JobQueue:
    """Accepts jobs from any thread; one worker thread runs them through `pipeline` (diffusers keyword names)."""

    def __init__(
        self,
        pipeline,
        *,
        output_dir: Path,
        state_file: Path | None = None,
        max_queue: int = 64,
        max_batch: int = 4,
        job_timeout: float = 600.0,
        keep_finished: int = 1000,
        set_loras: Callable[[object, tuple], None] | None = None,
    ):
        self.pipeline = pipeline
        self.output_dir = Path(output_dir)
        self.state_file = Path(state_file) if state_file else self.output_dir / "queue.jsonl"
        self.max_queue = max_queue
        self.max_batch = max_batch  # images per pipeline call; 1 switches batching off
        self.job_timeout = job_timeout
        self.keep_finished = keep_finished
        self.set_loras = set_loras
        self.metrics = Metrics()
        self._jobs: dict[str, Job] = {}
        self._waiting: dict[str, collections.deque[Job]] = {}
        self._line: collections.deque[str] = collections.deque()  # owners with waiting jobs, next to serve first
        self._listeners: dict[str, list[Callable[[dict], None]]] = collections.defaultdict(list)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._accepting = True
        self._closing = False
        self._abort = False
        self._worker: threading.Thread | None = None
        self._load()

    # ---- accepting and answering (any thread) -------------------------------------------------------------

    def submit(self, owner: str, spec: JobSpec) -> Job:
        with self._lock:
            if not self._accepting:
                raise ShuttingDown()
            if self.depth() >= self.max_queue:
                raise QueueFull(self.retry_after())
            job = Job(id=files.new_id(), owner=owner, spec=spec)
            self._jobs[job.id] = job
            self._enqueue(job)
            self._persist()
            self._emit(job, "queued")
            self._wake.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return job
            if job.state == "queued":
                self._waiting[job.owner].remove(job)
                if not self._waiting[job.owner]:
                    del self._waiting[job.owner]
                    self._line.remove(job.owner)
                self._finish(job, "cancelled")
            else:
                job.cancel_requested = True  # the step callback finishes it at the next step
            return job

    def subscribe(self, job_id: str, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call `listener(event)` on every change of the job (from the worker thread; it must not block)."""
        with self._lock:
            self._listeners[job_id].append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners.get(job_id, ()):
                    self._listeners[job_id].remove(listener)
                    if not self._listeners[job_id]:
                        del self._listeners[job_id]

        return unsubscribe

    def depth(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._waiting.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATES, 0)
            for job in self._jobs.values():
                counts[job.state] += 1
            return counts

    def retry_after(self) -> int:
        """Seconds until a place is likely free: about one pipeline call, when the next waiting job starts."""
        return max(1, math.ceil(self.metrics.call_seconds))

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="featherflux-queue", daemon=True)
        self._worker.start()

    def stop_accepting(self) -> None:
        """Refuse new jobs and tell every listener the server is going away (their streams can end)."""
        with self._lock:
            self._accepting = False
            for job_id in list(self._listeners):
                for listener in list(self._listeners[job_id]):
                    listener({"event": "shutdown", "id": job_id})

    def close(self, drain_seconds: float = 30.0) -> None:
        """Let the running batch finish for up to `drain_seconds`, else stop it and put its jobs back; save."""
        self.stop_accepting()
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(drain_seconds)
            if self._worker.is_alive():
                self._abort = True
                self._worker.join()
        with self._lock:
            self._persist()

    # ---- the worker -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._line:
                    self._wake.wait()
                if self._closing:
                    return
                batch = self._take_batch()
                for job in batch:
                    job.state, job.started, job.step = "running", time.time(), 0
                    self._emit(job, "running")
                self._persist()
            started = time.monotonic()
            self._run(batch)
            with self._lock:
                self.metrics.call_seconds = 0.8 * self.metrics.call_seconds + 0.2 * (time.monotonic() - started)
                self._persist()

    def _take_batch(self) -> list[Job]:
        """The next owner in line gives its oldest job; other owners' oldest compatible jobs fill the batch."""
        served: list[str] = []
        first = self._waiting[self._line[0]].popleft()
        batch, images, key = [first], first.spec.n, first.spec.batch_key()
        served.append(first.owner)
        growing = key is not None
        while growing and images < self.max_batch:
            growing = False
            for owner in [*self._line][1:] + [self._line[0]]:
                waiting = self._waiting[owner]
                if waiting and waiting[0].spec.batch_key() == key and images + waiting[0].spec.n <= self.max_batch:
                    job = waiting.popleft()
                    batch.append(job)
                    images += job.spec.n
                    growing = True
                    if owner not in served:
                        served.append(owner)
        self._line = collections.deque([o for o in self._line if o not in served] + served)
        for owner in [o for o in self._line if not self._waiting[o]]:
            self._line.remove(owner)
            del self._waiting[owner]
        return batch

    def _run(self, batch: list[Job]) -> None:
        spec = batch[0].spec
        last = [time.monotonic()]

        def on_step(pipe, step, timestep, callback_kwargs):
            now = time.monotonic()
            with self._lock:
                self.metrics.observe_step(now - last[0])
                last[0] = now
                for job in batch:
                    if job.state != "running":
                        continue
                    if job.cancel_requested:
                        self._finish(job, "cancelled")
                    elif time.time() - job.started > self.job_timeout:
                        self._finish(
                            job,
                            "failed",
                            status=504,
                            error=(
                                f"the job ran past the {self.job_timeout:g} s time limit; "
                                "ask for fewer steps or a smaller size"
                            ),
                        )
                    else:
                        job.step = step + 1
                        self._emit(job, "progress")
                if self._abort or all(job.state != "running" for job in batch):
                    raise _Stop()
            return {}

        try:
            if self.set_loras is not None:
                self.set_loras(self.pipeline, spec.loras)
            kwargs = {}
            if spec.references:
                kwargs["image"] = [files.load_upload(self.output_dir, name) for name in spec.references]
            generators = [
                torch.Generator("cpu").manual_seed(job.spec.seed + i) for job in batch for i in range(job.spec.n)
            ]
            images = self.pipeline(
                prompt=[job.spec.prompt for job in batch for _ in range(job.spec.n)],
                height=spec.height,
                width=spec.width,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                generator=generators,
                num_images_per_prompt=1,
                output_type="pil",
                callback_on_step_end=on_step,
                show_progress=False,
                **kwargs,
            ).images
        except _Stop:
            with self._lock:
                for job in batch:
                    if job.state == "running":  # stopped by shutdown: back to the queue file, resumed on restart
                        job.state, job.step, job.started = "queued", 0, None
            return
        except Exception as e:
            if len(batch) > 1:  # run each alone so one bad job cannot fail its batch-mates
                log.warning("batch of %d failed (%s); retrying its jobs one by one", len(batch), e)
                for job in batch:
                    if job.state == "running":
                        self._run([job])
                return
            if isinstance(e, UserError):
                self._fail(batch, 400, str(e))
                return
            log.exception("job %s failed", batch[0].id)
            self._fail(batch, 500, f"internal error while generating: {type(e).__name__}: {e}")
            return
        self._store(batch, images)

    def _store(self, batch: list[Job], images: list) -> None:
        offset, model = 0, getattr(self.pipeline, "model_id", None)
        for job in batch:
            mine = images[offset : offset + job.spec.n]
            offset += job.spec.n
            if job.state != "running":  # cancelled or timed out during the call; its images are not wanted
                continue
            try:
                names = [
                    files.write_output(self.output_dir, job.id, i, image, job.spec.parameters(i) | {"model": model})
                    for i, image in enumerate(mine)
                ]
            except OSError as e:
                self._fail([job], 500, f"could not store the image: {e}")
                continue
            with self._lock:
                job.files = names
                job.step = job.spec.steps
                now = time.monotonic()
                self.metrics.images_total += len(names)
                self.metrics.image_times.extend([now] * len(names))
                self._finish(job, "succeeded")

    def _fail(self, batch: list[Job], status: int, error: str) -> None:
        with self._lock:
            for job in batch:
                if job.state == "running":
                    self._finish(job, "failed", status=status, error=error)

    # ---- bookkeeping (lock held) ---------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        if job.owner not in self._waiting:
            self._waiting[job.owner] = collections.deque()
            self._line.append(job.owner)
        self._waiting[job.owner].append(job)

    def _finish(self, job: Job, state: str, *, status: int | None = None, error: str | None = None) -> None:
        job.state, job.status, job.error, job.finished = state, status, error, time.time()
        files.delete_uploads(self.output_dir, job.spec.references)
        self._emit(job, "done")
        self._persist()

    def _emit(self, job: Job, event: str) -> None:
        payload = {"event": event} | job.public()
        for listener in list(self._listeners.get(job.id, ())):
            listener(payload)

    def _persist(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.state in FINISHED), key=lambda j: j.finished)
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=f".{self.state_file.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            for job in self._jobs.values():
                f.write(json.dumps(job.record()) + "\n")
        os.replace(tmp, self.state_file)

    def _load(self) -> None:
        if not self.state_file.exists():
            return
        for number, line in enumerate(self.state_file.read_text().splitlines(), 1):
            try:
                job = Job.from_record(json.loads(line))
            except (ValueError, TypeError, KeyError) as e:
                raise UserError(
                    f"{self.state_file} line {number} is not a job record ({e}); "
                    "fix or move the file away to start with an empty queue"
                ) from None
            self._jobs[job.id] = job
            if job.state not in FINISHED:  # queued, or running when the previous server stopped
                job.state, job.step, job.started = "queued", 0, None
                self._enqueue(job)
        log.info("resumed %d unfinished jobs from %s", self.depth(), self.state_file)
