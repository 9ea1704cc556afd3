"""Batch jobs: one JSON object per line in, one PNG per job plus a manifest line out.

A job line looks like
    {"prompt": "a red star on a blue background", "seed": 7, "size": "64x64", "steps": 4,
     "guidance": 1.0, "loras": ["style.safetensors:0.8"], "references": ["ref.png"], "id": "star-7"}
Only `prompt` is required. A job's id is its `id` field or, failing that, its line number and a hash of its
content, so a rerun over the same file recognises finished jobs in the manifest and skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from featherflux.errors import MissingFileError

JOB_FIELDS = {"id", "prompt", "seed", "size", "width", "height", "steps", "guidance", "loras", "references"}


@dataclass(frozen=True)
class BatchJob:
    id: str
    line: int
    prompt: str
    seed: int
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    loras: tuple[tuple[str, float], ...] = ()
    references: tuple[str, ...] = ()

    @property
    def file_name(self) -> str:
        return f"{self.id}.png"


def _parse_lora(item) -> tuple[str, float]:
    if isinstance(item, dict):
        return str(item["path"]), float(item.get("scale", 1.0))
    path, sep, scale = str(item).rpartition(":")
    if sep and path and _is_float(scale):
        return path, float(scale)
    return str(item), 1.0


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _safe_id(raw: str) -> str:
    """Job ids become file names: keep them to a plain, non-traversing alphabet."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip(".")
    if not cleaned:
        raise ValueError("id is empty after removing characters not allowed in file names")
    return cleaned[:120]


def parse_job(obj: dict, line: int) -> BatchJob:
    """One decoded JSON line -> a BatchJob; raises ValueError or TypeError with the reason on a bad line."""
    if not isinstance(obj, dict):
        raise TypeError("expected a JSON object")
    unknown = set(obj) - JOB_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; known: {sorted(JOB_FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    width, height = obj.get("width"), obj.get("height")
    if "size" in obj:
        try:
            width, height = (int(v) for v in str(obj["size"]).lower().split("x"))
        except ValueError:
            raise ValueError(f"'size' must look like '512x512', got {obj['size']!r}") from None
    content = json.dumps({k: obj[k] for k in sorted(obj) if k != "id"}, sort_keys=True)
    digest = hashlib.sha256(content.encode()).hexdigest()[:10]
    job_id = _safe_id(str(obj["id"])) if "id" in obj else f"{line:06d}-{digest}"
    # Without an explicit seed, derive one from the content so reruns and other workers agree.
    seed = int(obj["seed"]) if "seed" in obj else int(digest[:8], 16)
    loras = obj.get("loras") or []
    refs = obj.get("references") or []
    if not isinstance(loras, list) or not isinstance(refs, list):
        raise TypeError("'loras' and 'references' must be lists")
    return BatchJob(
        id=job_id,
        line=line,
        prompt=prompt,
        seed=seed,
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        steps=None if obj.get("steps") is None else int(obj["steps"]),
        guidance=None if obj.get("guidance") is None else float(obj["guidance"]),
        loras=tuple(_parse_lora(item) for item in loras),
        references=tuple(str(r) for r in refs),
    )


def read_jobs(path: str | os.PathLike) -> tuple[list[BatchJob], list[str]]:
    """All valid jobs of a JSONL file, and one 'line N: reason' problem for each line skipped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"jobs file {path} does not exist; pass a JSONL file with one job object per line")
    jobs, problems, seen = [], [], set()
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                job = parse_job(json.loads(text), line_no)
            except (ValueError, TypeError, KeyError) as e:
                problems.append(f"line {line_no}: {e}")
                continue
            if job.id in seen:
                problems.append(f"line {line_no}: duplicate id {job.id!r}")
                continue
            seen.add(job.id)
            jobs.append(job)
    return jobs, problems


class Manifest:
    """The JSONL record of finished jobs. Each line is appended and flushed as soon as its PNG is in place,
    so a killed batch loses nothing that finished."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: dict[str, dict] = {}
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A kill mid-write left half a line: drop it (that job runs again) so appends start on a fresh line.
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(data))
        for text in data.decode("utf-8").splitlines():
            record = json.loads(text)
            self.done[record["id"]] = record

    def is_done(self, job: BatchJob, output_dir: Path) -> bool:
        return job.id in self.done and (output_dir / job.file_name).exists()

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["id"]] = record


def job_record(job: BatchJob, **extra) -> dict:
    record = asdict(job)
    record["loras"] = [list(item) for item in job.loras]
    record["references"] = list(job.references)
    record["file"] = job.file_name
    record.update(extra)
    return record
