"""Fixtures shared by all tests: the real MNIST data, prepared offline from ../shared/data."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.data import prepare_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The project's data folder with MNIST unpacked (copied from ../shared/data, never downloaded in CI)."""
    root = REPO / "data"
    prepare_data("mnist", root)
    return root
