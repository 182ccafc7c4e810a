"""Shared fixtures: the real data folder (from BERTKIT_DATA) and small deterministic configs."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# a model folder that is missing but reads as a Hugging Face Hub id is looked up in the Hub cache only: no test
# reaches the network, even from a shell that exported HF_HUB_OFFLINE=0, and none reads the user's own cache (a
# model cached there under a test's name would change what it checks). Read when huggingface_hub is first imported,
# so before any test imports it; the subprocesses the tests start inherit both.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="bertkit-tests-hub-cache-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)


def data_path(*parts: str) -> Path:
    """A path inside the shared data folder; skips the test when BERTKIT_DATA is unset or lacks it."""
    root = os.environ.get("BERTKIT_DATA")
    if not root:
        pytest.skip("BERTKIT_DATA is not set (it points at the shared real-data folder)")
    path = Path(root, *parts)
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return path


@pytest.fixture
def minilm_dir() -> Path:
    return data_path("checkpoints", "all-MiniLM-L6-v2")
