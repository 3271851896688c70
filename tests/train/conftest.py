"""Trainer tests run single-threaded: tiny ops are faster so, and runs compare bit-for-bit."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
