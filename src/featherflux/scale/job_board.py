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
its public `get`, `subscribe` and `cancel`.

Limits: the board is in memory (a restarted board forgets jobs; a restarted replica resumes its jobs from its
queue file but answers for them only itself), and a cross-replica event stream sees states at the poll interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from pathlib import Path

import ray

from featherflux.serve.auth import find_key, read_keys

log = logging.getLogger(__name__)

BOARD_NAME = "featherflux-job-board"
POLL_SECONDS = 0.25
JOB_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})(/events)?")
STATE_ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "cancelled": 2}
FINISHED = ("succeeded", "failed", "cancelled")  # serve.queue's; not imported, so the board's process skips torch


@ray.remote(num_cpus=0)
class JobBoard:
    """id -> {"owner", "replica", "public", "cancel"}; keeps the newest `keep` jobs."""

    def __init__(self, keep: int = 10_000):
        self.keep = keep
        self.jobs: dict[str, dict] = {}

    def publish(self, job_id: str, replica: int, owner: str, public: dict) -> None:
        entry = self.jobs.get(job_id)
        if entry is None:
            self.jobs[job_id] = {"owner": owner, "replica": replica, "public": public, "cancel": False}
            while len(self.jobs) > self.keep:
                del self.jobs[next(iter(self.jobs))]
        elif _progress(public) >= _progress(entry["public"]):  # listener calls may arrive out of order
            entry["public"] = public

    def get(self, job_id: str) -> dict | None:
        return self.jobs.get(job_id)

    def request_cancel(self, job_id: str) -> dict | None:
        entry = self.jobs.get(job_id)
        if entry is not None and entry["public"]["state"] not in FINISHED:
            entry["cancel"] = True
        return entry

    def take_cancels(self, replica: int) -> list[str]:
        """Ids of `replica`'s jobs someone asked to cancel; each is handed out once."""
        ids = [i for i, e in self.jobs.items() if e["replica"] == replica and e["cancel"]]
        for job_id in ids:
            self.jobs[job_id]["cancel"] = False
        return ids


def _progress(public: dict) -> tuple[int, int]:
    return STATE_ORDER[public["state"]], public["step"]


def job_board():
    """The cluster's board, created by the first replica that asks; it outlives replica restarts."""
    return JobBoard.options(name=BOARD_NAME, namespace=BOARD_NAME, get_if_exists=True, lifetime="detached",
                            max_restarts=-1).remote()


def shared_jobs(app, *, replica: int, api_keys: Path | None):
    """Wrap the image server's FastAPI `app` (replica number `replica`'s) so its jobs are visible to, and
    cancellable from, every replica."""
    queue = app.state.queue
    board = job_board()
    ray.get(board.get.remote(""))  # wait until the board runs, so the first job is not held up by its start
    keys = read_keys(api_keys) if api_keys is not None else None

    def requester(scope) -> str | None:
        """The owner name the server's app would give this request, or None when its key is missing or wrong."""
        if keys is None:
            return scope["client"][0] if scope.get("client") else "local"
        headers = dict(scope["headers"])
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return find_key(keys, key.strip()) if scheme.lower() == "bearer" and key.strip() else None

    def share(job_id: str) -> None:
        job = queue.get(job_id)
        if job is None:
            return

        def publish(event: dict) -> None:
            board.publish.remote(job_id, replica, job.owner, {k: v for k, v in event.items() if k != "event"})
            if event["event"] == "done":
                unsubscribe()

        unsubscribe = queue.subscribe(job_id, publish)
        ray.get(board.publish.remote(job_id, replica, job.owner, job.public()))

    stopped = threading.Event()  # set when the app shuts down

    def cancel_loop() -> None:
        while not stopped.wait(POLL_SECONDS):
            try:
                for job_id in ray.get(board.take_cancels.remote(replica)):
                    queue.cancel(job_id)
            except ray.exceptions.RayError as e:  # the board restarting must not end cancellation for good
                log.warning("job board unreachable (%s); retrying", e)

    threading.Thread(target=cancel_loop, name="featherflux-board-cancels", daemon=True).start()

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
        entry = await board.get.remote(match[1])
        if entry is None or entry["owner"] != requester(scope):
            return await app(scope, receive, send)  # the server's app answers 401 or 404 exactly as it would alone
        if match[2] and method == "GET":
            return await _stream_from_board(send, board, match[1], entry)
        if method == "DELETE":
            entry = await board.request_cancel.remote(match[1])
            return await _json(send, 200, entry["public"])
        if method == "GET":
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


async def _stream_from_board(send, board, job_id: str, entry: dict) -> None:
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
        entry = await board.get.remote(job_id)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
