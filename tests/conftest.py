"""Shared test fixtures and paths. Tests mirror the package: tests/model, tests/data, tests/inference, tests/train,
tests/evaluate, tests/e2e. Helpers (not tests) live in tests/_support (tiny random models: _support.models); real
data in tests/fixtures."""

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


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """The processed dataset of the real Qlib fixture's daily bars (8 stocks; train 2021-01..2023-06, val
    2023-07..2024-03-29, test 2024-04..; ``_support.training.make_dataset``), written once per session.

    Shared by every test that reads it: nothing may write into it (a test that changes a dataset writes its own).
    """
    from _support.training import make_dataset

    return make_dataset(tmp_path_factory.mktemp("qlib_dataset") / "dataset")


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
