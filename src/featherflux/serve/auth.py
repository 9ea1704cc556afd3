"""API keys and per-key rate limits.

A keys file holds one `name:sha256-hex` line per key (blank lines and `#` comments allowed); the key itself is
shown once when made and never stored. A presented key is hashed and compared with every stored hash in constant
time, so neither the comparison nor the search order leaks how close a guess was. Rate limits are token buckets
per key name: `burst` requests at once, refilled at `per_minute`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from featherflux.errors import MissingFileError, UserError

NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
HEX = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> dict[str, str]:
    """name -> sha256 hex, from a keys file; a malformed line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"API keys file {path} does not exist; make one with `featherflux keys add NAME --file {path}`")
    keys: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, digest = line.partition(":")
        if not NAME.fullmatch(name) or not HEX.fullmatch(digest):
            raise UserError(
                f"{path} line {number} is not `name:sha256-hex`; remake the key with `featherflux keys add`"
            )
        if name in keys:
            raise UserError(f"{path} line {number}: key name {name!r} appears twice; names must be unique")
        keys[name] = digest
    if not keys:
        raise UserError(f"API keys file {path} holds no keys; add one with `featherflux keys add NAME --file {path}`")
    return keys


def add_key(path: Path, name: str) -> str:
    """Make a new key for `name`, append its hash to the keys file, and return the key (shown once)."""
    path = Path(path)
    if not NAME.fullmatch(name):
        raise UserError(f"key name {name!r} must be 1-64 letters, digits or _ . @ -")
    if path.exists() and name in read_keys(path):
        raise UserError(f"{path} already has a key named {name!r}; pick another name")
    key = "ff-" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{name}:{hash_key(key)}\n")
    return key


def find_key(keys: dict[str, str], presented: str) -> str | None:
    """The name whose hash matches the presented key, or None; every stored hash is compared, in constant time."""
    digest = hash_key(presented).encode()
    found = None
    for name, stored in keys.items():
        if hmac.compare_digest(digest, stored.encode()):
            found = name
    return found


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token bucket per key name: `take(name)` returns 0 when allowed, else the seconds to wait."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, name: str) -> float:
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(name, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate
