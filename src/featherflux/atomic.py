"""Atomic file writes, so nothing a user made is ever left half-written.

`write(tmp)` writes a fresh temporary file beside the target, which is then moved into place with `os.replace`.
The writer creates the file itself, so it gets the umask's mode (mkstemp's 0600 would survive the rename); on
failure the temporary file is removed and an earlier file at the target is untouched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
