import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's
# spin-waiting makes them many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
