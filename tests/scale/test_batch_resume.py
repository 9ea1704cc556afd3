"""A batch killed halfway loses nothing: the rerun skips what the manifest holds and renders only the rest."""

import json
import os
import signal
import subprocess
import sys
import time

from featherflux.scale.batch import MANIFEST_NAME, run_batch
from tests.scale.test_ray_batch import write_jobs


def manifest_ids(out) -> list[str]:
    path = out / MANIFEST_NAME
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_killed_batch_resumes_without_redoing_finished_jobs(tiny_klein, tmp_path):
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", 12), tmp_path / "out"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "featherflux", "batch", str(jobs), "--output", str(out),
                             "--model", str(tiny_klein)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(manifest_ids(out)) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the batch did not get going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = manifest_ids(out)
    assert 5 <= len(finished) < 12, "kill the batch halfway"
    before = {name: (out / f"{name}.png").stat() for name in finished}

    report = run_batch(jobs, out, str(tiny_klein))
    assert (report.skipped, report.done, report.failed) == (len(finished), 12 - len(finished), [])
    for name, stat in before.items():  # finished pictures were not rendered again
        after = (out / f"{name}.png").stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    ids = manifest_ids(out)
    assert len(ids) == len(set(ids)) == 12
    assert len(list(out.glob("*.png"))) == 12
    assert run_batch(jobs, out, str(tiny_klein)).done == 0
