import json

from featherflux.scale.batch import run_batch


def write_jobs(path, count):
    lines = [json.dumps({"prompt": f"a red star number {i}", "seed": 100 + i, "size": "64x64", "steps": 2})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ray_batch_equals_in_process_batch_byte_for_byte(ray_cluster, tiny_klein, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    local = run_batch(jobs, tmp_path / "local", str(tiny_klein))
    on_ray = run_batch(jobs, tmp_path / "ray", str(tiny_klein), use_ray=True, workers=2)
    assert (local.done, on_ray.done) == (20, 20) and not local.failed and not on_ray.failed
    names = sorted(p.name for p in (tmp_path / "local").glob("*.png"))
    assert len(names) == 20
    assert names == sorted(p.name for p in (tmp_path / "ray").glob("*.png"))
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
