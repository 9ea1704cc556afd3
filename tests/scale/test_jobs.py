import json

import pytest

from featherflux.errors import UserError
from featherflux.scale.jobs import Manifest, job_record, parse_job, read_jobs


def test_malformed_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    lines = [
        json.dumps({"prompt": "a red star on a blue background", "seed": 1}),
        "{not json",
        json.dumps({"seed": 3}),
        "",
        json.dumps({"prompt": "a green circle", "size": "64by64"}),
        json.dumps({"prompt": "a blue square", "colour": "red"}),
        json.dumps({"prompt": "a blue square", "id": "same"}),
        json.dumps({"prompt": "a blue square again", "id": "same"}),
        json.dumps(["a list"]),
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    jobs, problems = read_jobs(path)
    assert [job.line for job in jobs] == [1, 7]
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 5", "line 6", "line 8", "line 9"]
    assert "prompt" in problems[1] and "size" in problems[2] and "colour" in problems[3] and "duplicate" in problems[4]


def test_job_ids_are_stable_and_safe_file_names():
    job = parse_job({"prompt": "x", "seed": 5}, line=4)
    assert job == parse_job({"seed": 5, "prompt": "x"}, line=4)  # key order does not matter
    assert job.id != parse_job({"prompt": "x", "seed": 6}, line=4).id
    assert job.id.startswith("000004-")
    unsafe = parse_job({"prompt": "x", "id": "../../etc/passwd"}, line=1)
    assert "/" not in unsafe.file_name and not unsafe.file_name.startswith(".")


def test_job_fields_parse_like_the_cli():
    job = parse_job({"prompt": "x", "size": "96x64", "loras": ["style.safetensors:0.5", {"path": "b.safetensors"}],
                     "references": ["a.png"], "steps": 3, "guidance": 2}, line=1)
    assert (job.width, job.height, job.steps, job.guidance) == (96, 64, 3, 2.0)
    assert job.loras == (("style.safetensors", 0.5), ("b.safetensors", 1.0))
    assert job.references == ("a.png",)
    assert parse_job({"prompt": "x"}, 1).seed == parse_job({"prompt": "x"}, 1).seed  # derived, deterministic


def test_manifest_survives_a_line_cut_short(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "fi')
    manifest = Manifest(tmp_path / "manifest.jsonl")
    assert set(manifest.done) == {"a"}
    job = parse_job({"prompt": "x", "id": "c"}, 1)
    manifest.append(job_record(job))
    assert set(Manifest(tmp_path / "manifest.jsonl").done) == {"a", "c"}


def test_missing_jobs_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_jobs(tmp_path / "nope.jsonl")
