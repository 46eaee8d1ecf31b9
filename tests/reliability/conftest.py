"""Shared fixtures of the reliability tests: a fixed seed and one intra-op thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_single_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
