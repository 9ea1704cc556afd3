"""Jobs across Ray Serve replicas: any replica answers `GET /v1/jobs/{id}`, its event stream, and `DELETE`.

A job runs on the replica that took its `POST /v1/jobs`, but Serve may route the follow-up requests to another
replica. One named Ray actor, the job board, holds each job's latest public state, its owner and a cancel flag:
- the owning replica publishes every state change of its jobs to the board (fire-and-forget actor calls from
  the queue's listener), and polls the board for cancel flags of its jobs, cancelling them in its own queue;
- a replica asked about a job its own queue does not hold answers from the board, after checking that the
  requester owns the job (the same rule as the single-process server: API key name, or client address without
  keys); a DELETE sets the flag, an event stream polls the board.
Everything else passes straight to the replica's own app, so a request for a job the replica holds is served
exactly as by `featherflux serve`. The wrapper is plain ASGI around the server's app; the queue is used only through
its public `get`, `subscribe`, `cancel` and `file` (the queue file that lists every job it holds).

Restarts: the board is only a cache; the truth is every replica's queue file (`queue-replica-{rank}.jsonl`) in
the shared output folder. A board that restarts, or is killed and created again by the next replica that calls it,
starts empty under a new instance id: each replica sees the new id at its next poll and publishes all its jobs
again, and until then a replica asked about a job the board lacks reads it from the queue files (requests wait up
to BOARD_WAIT_SECONDS for a restarting board, then get a 503). A restarted replica (same rank, same file) resumes its
unfinished jobs from step 0 and publishes them as a new incarnation, whose states replace the old one's. A job whose
replica has not polled the board for ORPHAN_SECONDS (10 minutes) is reported failed (status 503) once asked about,
and flagged for cancelling, so a replica that comes back later drops it rather than run it; finished is final.

Limits: a cancel asked for in the quarter second before the board restarts may be lost (ask again), and a
cross-replica event stream sees states at the poll interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from pathlib import Path

import ray

from featherflux.errors import UserError
from featherflux.serve.auth import find_key, read_keys

log = logging.getLogger(__name__)

BOARD_NAME = "featherflux-job-board"
POLL_SECONDS = 0.25
ORPHAN_SECONDS = 600.0  # a replica silent this long is gone: its unfinished jobs are reported failed
BOARD_WAIT_SECONDS = 10.0  # how long a request waits for a restarting board before answering 503
QUEUE_FILE = "queue-replica-{rank}.jsonl"  # each replica's queue file, in the shared output folder
QUEUE_FILE_NAME = re.compile(r"queue-replica-(\d+)\.jsonl")
JOB_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})(/events)?")
STATE_ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "cancelled": 2}
FINISHED = ("succeeded", "failed", "cancelled")  # serve.queue's; not imported, so the board's process skips torch


@ray.remote(num_cpus=0)
class JobBoard:
    """id -> {"owner", "replica", "public", "cancel", "source"}; keeps the newest `keep` jobs.

    `source` is the incarnation (one per replica start) that published the state, or None for a state read from a
    queue file. A new incarnation's state replaces an older one's (a restarted replica runs its resumed jobs from
    the start); within one, states only advance (listener calls may arrive out of order); a finished state is final.
    """

    def __init__(self, keep: int = 10_000, orphan_seconds: float = ORPHAN_SECONDS):
        self.keep = keep
        self.orphan_seconds = orphan_seconds
        self.instance = secrets.token_hex(8)  # new at every start: replicas then publish all their jobs again
        self.started = time.monotonic()
        self.seen: dict[int, float] = {}  # replica -> when it last polled or published
        self.jobs: dict[str, dict] = {}

    def publish(self, job_id: str, replica: int, owner: str, public: dict, source: str | None = None) -> None:
        if source is not None:
            self.seen[replica] = time.monotonic()
        entry = self.jobs.get(job_id)
        if entry is None:
            self.jobs[job_id] = {"owner": owner, "replica": replica, "public": public, "cancel": False,
                                 "source": source}
            while len(self.jobs) > self.keep:
                del self.jobs[next(iter(self.jobs))]
        elif entry["public"]["state"] in FINISHED:
            return
        elif source == entry["source"]:
            if _progress(public) >= _progress(entry["public"]):
                entry["public"] = public
        elif source is not None:
            entry.update(replica=replica, public=public, source=source)

    def publish_many(self, replica: int, source: str, jobs: list[tuple[str, str, dict]]) -> str:
        """Publish (id, owner, public) of all `replica`'s jobs; returns the board's instance id."""
        self.seen[replica] = time.monotonic()
        for job_id, owner, public in jobs:
            self.publish(job_id, replica, owner, public, source)
        return self.instance

    def fill(self, job_id: str, replica: int, owner: str, public: dict) -> dict:
        """Add a job read from `replica`'s queue file, unless the board knows it already; the job's entry."""
        self.publish(job_id, replica, owner, public)
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        entry = self.jobs.get(job_id)
        if entry is not None and entry["public"]["state"] not in FINISHED:
            silent = time.monotonic() - self.seen.get(entry["replica"], self.started)
            if silent > self.orphan_seconds:
                entry["public"] = entry["public"] | {
                    "state": "failed", "status": 503, "finished": time.time(),
                    "error": f"replica {entry['replica']}, which ran this job, stopped and has not come back for "
                             f"{silent:.0f} s; submit the job again"}
                entry["cancel"] = True  # should the replica come back, it drops the job rather than run it
        return entry

    def request_cancel(self, job_id: str) -> dict | None:
        entry = self.get(job_id)
        if entry is not None and entry["public"]["state"] not in FINISHED:
            entry["cancel"] = True
        return entry

    def take_cancels(self, replica: int) -> tuple[str, list[str]]:
        """The board's instance id and the ids of `replica`'s jobs someone asked to cancel (each handed out once)."""
        self.seen[replica] = time.monotonic()
        ids = [i for i, e in self.jobs.items() if e["replica"] == replica and e["cancel"]]
        for job_id in ids:
            self.jobs[job_id]["cancel"] = False
        return self.instance, ids


def _progress(public: dict) -> tuple[int, int]:
    return STATE_ORDER[public["state"]], public["step"]


def job_board():
    """The cluster's board, created by the first replica that asks; it outlives replica restarts."""
    return JobBoard.options(name=BOARD_NAME, namespace=BOARD_NAME, get_if_exists=True, lifetime="detached",
                            max_restarts=-1).remote()


class _Board:
    """A replica's way to the board: calls wait out a board restart, and find the board again (or create a new one)
    when the actor died."""

    def __init__(self):
        self.handle = job_board()
        self._lock = threading.Lock()

    def _renew(self, failed) -> None:
        with self._lock:
            if self.handle is failed:
                self.handle = job_board()

    def call(self, method: str, *args, wait: float = BOARD_WAIT_SECONDS):
        """`method(*args)` on the board, from a thread."""
        deadline = time.monotonic() + wait
        while True:
            handle = self.handle
            try:
                return ray.get(getattr(handle, method).remote(*args), timeout=wait)
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                self._renew(handle)
                time.sleep(POLL_SECONDS)

    async def acall(self, method: str, *args):
        """`method(*args)` on the board, from the event loop."""
        deadline = time.monotonic() + BOARD_WAIT_SECONDS
        while True:
            handle = self.handle
            try:
                return await getattr(handle, method).remote(*args)
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.to_thread(self._renew, handle)
                await asyncio.sleep(POLL_SECONDS)


class _QueueFiles:
    """Every replica's queue file in one folder, each parsed again only when it changed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._parsed: dict[Path, tuple[tuple, dict]] = {}  # path -> (stat key, id -> Job)
        self._lock = threading.Lock()

    def find(self, job_id: str) -> tuple[int, str, dict] | None:
        """(replica, owner, public state) of the job as its replica's queue file holds it, or None."""
        from featherflux.serve.queue import JobFile  # here, so the board's process (no replicas) skips torch

        with self._lock:
            for path in sorted(self.folder.glob(QUEUE_FILE.format(rank="*"))):
                name = QUEUE_FILE_NAME.fullmatch(path.name)
                if name is None:
                    continue
                try:
                    stat = path.stat()
                    key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                    if self._parsed.get(path, (None,))[0] != key:
                        self._parsed[path] = key, {job.id: job for job in JobFile(path, 0).load()}
                except (OSError, UserError) as e:
                    log.warning("skipping queue file %s: %s", path, e)
                    continue
                job = self._parsed[path][1].get(job_id)
                if job is not None:
                    return int(name[1]), job.owner, job.public()
        return None


def shared_jobs(app, *, replica: int, api_keys: Path | None):
    """Wrap the image server's FastAPI `app` (replica number `replica`'s) so its jobs are visible to, and
    cancellable from, every replica, also after the board or a replica restarted."""
    queue = app.state.queue
    board = _Board()
    files = _QueueFiles(queue.file.path.parent)
    keys = read_keys(api_keys) if api_keys is not None else None
    incarnation = secrets.token_hex(8)  # this start of the replica; its states replace an earlier start's
    followed: set[str] = set()  # unfinished jobs whose changes this replica publishes
    lock = threading.Lock()

    def requester(scope) -> str | None:
        """The owner name the server's app would give this request, or None when its key is missing or wrong."""
        if keys is None:
            return scope["client"][0] if scope.get("client") else "local"
        headers = dict(scope["headers"])
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return find_key(keys, key.strip()) if scheme.lower() == "bearer" and key.strip() else None

    def follow(job) -> None:
        """Publish every later change of `job` to whichever board is current."""
        with lock:
            if job.id in followed or job.state in FINISHED:
                return
            followed.add(job.id)

        def publish(event: dict) -> None:
            if event["event"] == "shutdown":  # the server is stopping; not a state
                return
            board.handle.publish.remote(job.id, replica, job.owner,
                                        {k: v for k, v in event.items() if k != "event"}, incarnation)
            if event["event"] == "done":
                stop()

        def stop() -> None:
            for unsubscribe in subscription:
                unsubscribe()
            with lock:
                followed.discard(job.id)

        subscription = []  # filled once `subscribe` returns, which may be after the job's "done" event
        subscription.append(queue.subscribe(job.id, publish))
        if job.state in FINISHED:  # finished before the subscription was in place: stop following
            stop()

    def share(job_id: str) -> None:
        """Put a newly accepted job on the board (others find it in the queue file should the board be away)."""
        job = queue.get(job_id)
        if job is None:
            return
        follow(job)
        try:
            board.call("publish", job_id, replica, job.owner, job.public(), incarnation, wait=2.0)
        except ray.exceptions.RayError as e:
            log.warning("job %s is not on the job board yet (%s)", job_id, e)

    def share_all() -> str:
        """Publish every job this replica holds (its queue file lists them all) and follow the unfinished ones;
        returns the instance id of the board that heard them."""
        jobs = [job for job in map(queue.get, [record.id for record in queue.file.load()]) if job is not None]
        for job in jobs:
            follow(job)
        return board.call("publish_many", replica, incarnation, [(job.id, job.owner, job.public()) for job in jobs])

    try:  # a restarted replica's resumed jobs are on the board before it takes requests
        known = share_all()
    except ray.exceptions.RayError as e:
        log.warning("job board unreachable (%s); retrying", e)
        known = None
    stopped = threading.Event()  # set when the app shuts down

    def board_loop() -> None:
        nonlocal known
        while not stopped.wait(POLL_SECONDS):
            try:
                instance, cancels = board.call("take_cancels", replica)
                if instance != known:  # a new board: it has not heard of this replica's jobs
                    known = share_all()
                for job_id in cancels:
                    queue.cancel(job_id)
            except (ray.exceptions.RayError, OSError, UserError) as e:  # a board restart must not end this loop
                log.warning("job board unreachable (%s); retrying", e)

    threading.Thread(target=board_loop, name="featherflux-board", daemon=True).start()

    async def lookup(job_id: str) -> dict | None:
        """The board's entry for a job this replica does not hold; from the queue files when the board lacks it
        (it restarted and the owner has not published again yet, or the owner is gone)."""
        entry = await board.acall("get", job_id)
        if entry is None:
            found = await asyncio.to_thread(files.find, job_id)
            if found is not None:
                entry = await board.acall("fill", job_id, *found)
        return entry

    async def wrapped(scope, receive, send):
        if scope["type"] == "lifespan":
            try:
                return await app(scope, receive, send)
            finally:
                stopped.set()
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if method == "POST" and path == "/v1/jobs":
            return await app(scope, receive, _publishing(send, share))
        match = JOB_PATH.fullmatch(path)
        if match is None or queue.get(match[1]) is not None:
            return await app(scope, receive, send)
        try:
            entry = await lookup(match[1])
            mine = entry is not None and entry["owner"] == requester(scope)
            if mine and method == "DELETE" and not match[2]:
                entry = await board.acall("request_cancel", match[1]) or entry  # None: the board just restarted
        except ray.exceptions.RayError as e:
            log.warning("job board unreachable (%s)", e)
            return await _json(send, 503, {"error": {"message": "the job board is restarting; retry in a few seconds",
                                                     "type": "server_error", "param": None, "code": None}})
        if not mine:
            return await app(scope, receive, send)  # the server's app answers 401 or 404 exactly as it would alone
        if match[2] and method == "GET":
            return await _stream_from_board(send, lookup, match[1], entry)
        if not match[2] and method in ("GET", "DELETE"):
            return await _json(send, 200, entry["public"])
        return await app(scope, receive, send)

    wrapped.state = app.state
    return wrapped


def _publishing(send, share):
    """A `send` that puts a newly accepted job on the board before its id reaches the client."""
    status = [0]

    async def wrapped_send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif message["type"] == "http.response.body" and status[0] == 202:
            job_id = json.loads(message["body"])["id"]
            await asyncio.to_thread(share, job_id)
        await send(message)

    return wrapped_send


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _stream_from_board(send, lookup, job_id: str, entry: dict) -> None:
    """Server-sent events like the server's `/v1/jobs/{id}/events`, from board states polled every POLL_SECONDS."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    last = None
    while entry is not None:
        public = entry["public"]
        if public != last:
            finished = public["state"] in FINISHED
            same_state = last is not None and last["state"] == public["state"]
            name = "done" if finished else ("progress" if same_state else public["state"])
            event = {"event": name} | public
            await send({"type": "http.response.body", "body": f"event: {name}\ndata: {json.dumps(event)}\n\n".encode(),
                        "more_body": not finished})
            if finished:
                return
            last = public
        await asyncio.sleep(POLL_SECONDS)
        entry = await lookup(job_id)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
