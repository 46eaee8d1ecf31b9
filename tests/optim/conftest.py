"""Shared fixtures of the optimizer tests: float64, a fixed seed and one intra-op thread.

The tests run many tiny ops; with several intra-op threads thread hand-offs dominate, so
every test here runs single-threaded.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_seed_single_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
