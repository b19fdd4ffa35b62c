from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model  # noqa: E402

torch.set_num_threads(2)

# Without a GPU, Triton kernels run in Triton's interpreter (set before any kernel is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter import skip_nested_language_patches  # noqa: E402

    skip_nested_language_patches()

# The engine's device in tests: "cpu" in CI; set MNEMOSYNE_TEST_DEVICE=cuda on a GPU machine.
TEST_DEVICE = os.environ.get("MNEMOSYNE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: name -> directory of a tiny random HF model (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(name, root)
        return built[name]

    return get
