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
