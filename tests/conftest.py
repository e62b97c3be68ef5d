"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the tests use tiny tensors, where OpenMP threads syncing on a
    2-core machine (busier still when CI shares it) cost more than they give, up to 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
