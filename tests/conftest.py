import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_default_dtype():
    """Tests run in parallel workers (pytest -n 2): one thread each avoids oversubscribing the cores."""
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(torch.float32)
