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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featherflux.atomic import atomic_write
from featherflux.errors import UserError
from featherflux.request import ImageParameters
from featherflux.serve import files
from featherflux.serve.metrics import Metrics

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
STATES = ("queued", "running", *FINISHED)


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
    mask: str | None = None  # inpainting: an upload name; the first reference is the picture repainted
    strength: float | None = None  # inpainting (with or without a mask: without, the whole picture changes)
    upsample: float | None = None  # dev's caption upsampling at this temperature, seeded with the job's seed

    @property
    def inpaint(self) -> bool:
        return self.mask is not None or self.strength is not None

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one forward pass; reference images make a job run alone."""
        if self.references or self.inpaint or self.upsample is not None:
            return None
        return (self.width, self.height, self.steps, self.guidance, self.loras)

    def image_parameters(self, index: int, model: str, upsampled: str | None = None) -> ImageParameters:
        """The PNG parameters of image `index` of this job (seeded `seed + index`)."""
        return ImageParameters(
            prompt=self.prompt,
            model=model,
            seed=self.seed + index,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance=self.guidance,
            references=self.references[1:] if self.inpaint else self.references,
            loras=tuple(f"{name}:{scale}" for name, scale in self.loras),
            init=self.references[0] if self.inpaint else None,
            mask=self.mask,
            strength=self.strength if self.strength is not None else (0.8 if self.inpaint else None),
            upsampled_prompt=upsampled,
        )


@dataclass
class Job:
    id: str
    owner: str
    spec: JobSpec
    model: str = ""  # the model id of the pipeline that runs it
    upsampled_prompt: str | None = None  # what caption upsampling wrote, once the job has run
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
            "parameters": self.spec.image_parameters(0, self.model, self.upsampled_prompt).as_dict()
            | {"n": self.spec.n},
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


class FairLine:
    """Waiting jobs: one FIFO per owner, owners served round-robin. Not thread-safe (the queue holds its lock)."""

    def __init__(self):
        self._waiting: dict[str, collections.deque[Job]] = {}
        self._owners: collections.deque[str] = collections.deque()  # owners with waiting jobs, next to serve first

    def __len__(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def add(self, job: Job) -> None:
        if job.owner not in self._waiting:
            self._waiting[job.owner] = collections.deque()
            self._owners.append(job.owner)
        self._waiting[job.owner].append(job)

    def remove(self, job: Job) -> None:
        self._waiting[job.owner].remove(job)
        if not self._waiting[job.owner]:
            del self._waiting[job.owner]
            self._owners.remove(job.owner)

    def take_batch(self, max_images: int) -> list[Job]:
        """The next owner in line gives its oldest job; other owners' oldest compatible jobs fill the batch."""
        served: list[str] = []
        first = self._waiting[self._owners[0]].popleft()
        batch, images, key = [first], first.spec.n, first.spec.batch_key()
        served.append(first.owner)
        growing = key is not None
        while growing and images < max_images:
            growing = False
            for owner in [*self._owners][1:] + [self._owners[0]]:
                waiting = self._waiting[owner]
                if waiting and waiting[0].spec.batch_key() == key and images + waiting[0].spec.n <= max_images:
                    job = waiting.popleft()
                    batch.append(job)
                    images += job.spec.n
                    growing = True
                    if owner not in served:
                        served.append(owner)
        self._owners = collections.deque([o for o in self._owners if o not in served] + served)
        for owner in [o for o in self._owners if not self._waiting[o]]:
            self._owners.remove(owner)
            del self._waiting[owner]
        return batch


class JobFile:
    """The queue's JSON-lines file: every job a line, rewritten atomically on each change of state."""

    def __init__(self, path: Path, keep_finished: int):
        self.path = path
        self.keep_finished = keep_finished

    def load(self) -> list[Job]:
        if not self.path.exists():
            return []
        jobs = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                jobs.append(Job.from_record(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise UserError(
                    f"{self.path} line {number} is not a job record ({e}); "
                    "fix or move the file away to start with an empty queue"
                ) from None
        return jobs

    def save(self, jobs: dict[str, Job]) -> None:
        """Write `jobs`, after dropping all but the newest `keep_finished` finished ones from it."""
        finished = sorted((j for j in jobs.values() if j.state in FINISHED), key=lambda j: j.finished)
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del jobs[job.id]
        text = "".join(json.dumps(job.record()) + "\n" for job in jobs.values())
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


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
        self.model = getattr(pipeline, "model_id", "")
        self.output_dir = Path(output_dir)
        self.file = JobFile(Path(state_file) if state_file else self.output_dir / "queue.jsonl", keep_finished)
        self.max_queue = max_queue
        self.max_batch = max_batch  # images per pipeline call; 1 switches batching off
        self.job_timeout = job_timeout
        self.set_loras = set_loras
        self.metrics = Metrics()
        self._jobs: dict[str, Job] = {}
        self._line = FairLine()
        self._listeners: dict[str, list[Callable[[dict], None]]] = collections.defaultdict(list)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._accepting = True
        self._closing = False
        self._abort = False
        self._worker: threading.Thread | None = None
        for job in self.file.load():
            self._jobs[job.id] = job
            if job.state not in FINISHED:  # queued, or running when the previous server stopped
                job.state, job.step, job.started = "queued", 0, None
                self._line.add(job)
        log.info("resumed %d unfinished jobs from %s", len(self._line), self.file.path)

    # ---- accepting and answering (any thread) -------------------------------------------------------------

    def submit(self, owner: str, spec: JobSpec) -> Job:
        with self._lock:
            if not self._accepting:
                raise ShuttingDown()
            if self.depth() >= self.max_queue:
                raise QueueFull(self.retry_after())
            job = Job(id=files.new_id(), owner=owner, spec=spec, model=self.model)
            self._jobs[job.id] = job
            self._line.add(job)
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
                self._line.remove(job)
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
            return len(self._line)

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
                while not self._closing and not len(self._line):
                    self._wake.wait()
                if self._closing:
                    return
                batch = self._line.take_batch(self.max_batch)
                for job in batch:
                    job.state, job.started, job.step = "running", time.time(), 0
                    self._emit(job, "running")
                self._persist()
            started = time.monotonic()
            self._run(batch)
            with self._lock:
                self.metrics.call_seconds = 0.8 * self.metrics.call_seconds + 0.2 * (time.monotonic() - started)
                self._persist()

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
            kwargs, generate = {}, self.pipeline
            pictures = [files.load_upload(self.output_dir, name) for name in spec.references]
            if spec.inpaint:
                generate = self.pipeline.inpaint
                kwargs["image"], kwargs["image_reference"] = pictures[0], pictures[1:] or None
                kwargs["mask_image"] = files.load_upload(self.output_dir, spec.mask, "L") if spec.mask else None
                if spec.strength is not None:
                    kwargs["strength"] = spec.strength
            elif pictures:
                kwargs["image"] = pictures
            prompts = [job.spec.prompt for job in batch for _ in range(job.spec.n)]
            if spec.upsample is not None:  # a batch of one job (see batch_key): its own seed picks the text
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(spec.seed)
                    (written,) = self.pipeline.upsample_prompt(
                        spec.prompt, [pictures] if pictures else None, spec.upsample
                    )
                batch[0].upsampled_prompt = written
                prompts = [written] * spec.n
            generators = [
                torch.Generator("cpu").manual_seed(job.spec.seed + i) for job in batch for i in range(job.spec.n)
            ]
            images = generate(
                prompt=prompts,
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
        offset = 0
        for job in batch:
            mine = images[offset : offset + job.spec.n]
            offset += job.spec.n
            if job.state != "running":  # cancelled or timed out during the call; its images are not wanted
                continue
            try:
                names = [
                    files.write_output(
                        self.output_dir, job.id, i, image, job.spec.image_parameters(i, job.model, job.upsampled_prompt)
                    )
                    for i, image in enumerate(mine)
                ]
            except OSError as e:
                self._fail([job], 500, f"could not store the image: {e}")
                continue
            with self._lock:
                job.files = names
                job.step = job.spec.steps
                self.metrics.observe_images(len(names))
                self._finish(job, "succeeded")

    def _fail(self, batch: list[Job], status: int, error: str) -> None:
        with self._lock:
            for job in batch:
                if job.state == "running":
                    self._finish(job, "failed", status=status, error=error)

    # ---- bookkeeping (lock held) ---------------------------------------------------------------------------

    def _finish(self, job: Job, state: str, *, status: int | None = None, error: str | None = None) -> None:
        job.state, job.status, job.error, job.finished = state, status, error, time.time()
        files.delete_uploads(self.output_dir, job.spec.references + ((job.spec.mask,) if job.spec.mask else ()))
        self._emit(job, "done")
        self._persist()

    def _emit(self, job: Job, event: str) -> None:
        payload = {"event": event} | job.public()
        for listener in list(self._listeners.get(job.id, ())):
            listener(payload)

    def _persist(self) -> None:
        self.file.save(self._jobs)
