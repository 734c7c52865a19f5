"""Shared fixtures. Data-writing helpers live in tests/source_data.py (PCam, ImageFolder, Kaggle layouts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.source_data import REAL_DATA, pcam_name


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / pcam_name("train", "x")).exists():
        pytest.skip(f"{REAL_DATA} not present")
    return REAL_DATA


@pytest.fixture
def keep_signal_handlers():
    """For tests that call `train()` in the pytest process: it installs the preemption handlers."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they are skipped (and shown as skipped), never failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
