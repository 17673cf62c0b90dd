"""Shared fixtures: offline mode, the tiny random model, and the real embedded model's cached folder."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402

from tiny_model import save_tiny_model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: tests on the real embedded model (slower, ~1 min)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def embedded_source() -> str:
    from rlhf_online.config import ModelConfig
    from rlhf_online.models import resolve_model_source

    return resolve_model_source(ModelConfig())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread, as the trainer runs: on 2 shared cores, more threads made training tests ~10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
