import pytest

from featherflux.cli import main
from featherflux.errors import UserError
from featherflux.serve.auth import RateLimiter, find_key, hash_key, read_keys


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    keys = tmp_path / "keys.txt"
    assert main(["keys", "add", "alice", "--file", str(keys)]) == 0
    assert main(["keys", "add", "bob", "--file", str(keys)]) == 0
    alice, bob = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    text = keys.read_text()
    assert alice not in text and bob not in text
    assert text.splitlines() == [f"alice:{hash_key(alice)}", f"bob:{hash_key(bob)}"]
    stored = read_keys(keys)
    assert find_key(stored, alice) == "alice" and find_key(stored, bob) == "bob"
    assert find_key(stored, alice + "x") is None and find_key(stored, "") is None
    assert main(["keys", "add", "alice", "--file", str(keys)]) == 2  # names are unique
    assert "already has a key" in capsys.readouterr().err


def test_malformed_keys_file_names_the_line(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nalice:" + "0" * 64 + "\nbob:not-a-hash\n")
    with pytest.raises(UserError, match="line 3"):
        read_keys(keys)
    with pytest.raises(UserError, match="does not exist"):
        read_keys(tmp_path / "missing")


def test_token_bucket_allows_a_burst_then_refills():
    limiter = RateLimiter(per_minute=600.0, burst=3)  # one token per 0.1 s
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("a")
    assert 0.0 < wait <= 0.1
    assert limiter.take("b") == 0.0  # buckets are per key


def test_keys_add_prints_only_the_key_on_stdout_for_scripts(tmp_path):
    """`KEY=$(featherflux keys add alice --file keys.txt)` holds just the key; the notice goes to stderr."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "featherflux", "keys", "add", "alice", "--file", str(tmp_path / "keys.txt")],
        capture_output=True, text=True, check=True,
    )
    (key,) = done.stdout.split()
    assert key.startswith("ff-") and "shown only now" in done.stderr
    assert find_key(read_keys(tmp_path / "keys.txt"), key) == "alice"
