"""Shared test setup: deterministic, single-threaded torch (the CI machine has 2 cores)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Every test starts seeded and single-threaded, whatever an earlier test (e.g. a trainer run) set.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
