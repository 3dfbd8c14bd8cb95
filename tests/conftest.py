"""Shared test fixtures and paths. Tests mirror the package: tests/model, tests/data, tests/inference, tests/train,
tests/evaluate, tests/e2e. Helpers (not tests) live in tests/_support; real data in tests/fixtures."""
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # makes `_support` importable from every test folder

REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"
KLINE_CSV = FIXTURES / "kline_5min.csv"
QLIB_CN = FIXTURES / "qlib_cn"
PARITY = FIXTURES / "parity-tiny"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's torch work on one thread (faster and steadier on the 2-core CI machine), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is present (``make gpu-check`` runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `make gpu-check` on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
