import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_default_dtype():
    """Tests run in parallel workers (pytest -n 2): one thread each avoids oversubscribing the cores."""
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(torch.float32)


def load_reference_fixture(name: str) -> tuple[dict, dict, dict]:
    """A golden reference fixture from tests/fixtures: ``(sidecar json, all tensors, the reference state dict)``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    fixtures = Path(__file__).parent / "fixtures"
    meta = json.loads((fixtures / f"{name}.json").read_text())
    tensors = load_file(str(fixtures / f"{name}.safetensors"))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return meta, tensors, state
