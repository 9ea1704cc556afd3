"""A stand-in for the Hugging Face hub on loopback: the few endpoints huggingface_hub's downloads call, serving
repos made of local folders. Tests point HF_ENDPOINT at it; nothing reaches the internet.

- GET /api/models/{repo}/revision/{rev}: the repo's commit; GET /api/models/{repo}/tree/{rev}: its file list.
- HEAD and GET /{repo}/resolve/{rev}/{path}: a file, with the headers huggingface_hub reads (X-Repo-Commit, ETag,
  Content-Length) and Range requests, so an interrupted download can resume.
- A gated repo answers 401 with X-Error-Code: GatedRepo; an unknown one 404 with RepoNotFound.
- `cut`: paths whose first GET sends half the file and then drops the connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlsplit

COMMIT = "a" * 40


class HubStandIn:
    def __init__(self, repos: dict[str, Path], gated: set[str] = frozenset(), cut: set[str] = frozenset()):
        self.repos, self.gated, self.cut = repos, set(gated), set(cut)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                stand_in.answer(self, body=False)

            def do_GET(self):
                stand_in.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo not in self.repos:
            return self.error(handler, 404, "RepoNotFound")
        if repo in self.gated:
            return self.error(handler, 401, "GatedRepo")
        files = self.files(repo)
        if api and api.group(2) == "revision":
            siblings = [{"rfilename": name} for name in files]
            return self.json(handler, {"id": repo, "sha": COMMIT, "siblings": siblings, "private": False}, body)
        if api:
            entries = [{"type": "file", "path": n, "size": p.stat().st_size, "oid": _oid(p)} for n, p in files.items()]
            return self.json(handler, entries, body)
        name = resolve.group(3)
        if name not in files:
            return self.error(handler, 404, "EntryNotFound")
        self.file(handler, repo, name, files[name].read_bytes(), body)

    def file(self, handler, repo: str, name: str, data: bytes, body: bool) -> None:
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or ""):
            start = int(match.group(1))
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        key = f"{repo}/{name}"
        if key in self.cut:  # send half, then drop the connection (once)
            self.cut.discard(key)
            handler.wfile.write(data[start : start + (len(data) - start) // 2])
            handler.wfile.flush()
            time.sleep(0.3)  # let the client take in what arrived before the connection drops
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        handler.wfile.write(data[start:])

    @staticmethod
    def json(handler, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def error(handler, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
