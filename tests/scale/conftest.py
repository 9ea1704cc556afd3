"""One local CPU Ray cluster and one tiny pipeline folder, shared by every Ray test (both are slow to start)."""

import os

import pytest

from tests.tiny import tiny_pipeline_dir

# Ray workers import torch and transformers afresh; one intra-op thread each keeps the 2-core machine from
# spin-waiting, and makes their float results match the in-process runs (tests/conftest.py sets 1 thread too).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory):
    return tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()
