"""Shared fixtures. Importing weather_pipeline first sets up native-library load order."""

from __future__ import annotations

from pathlib import Path

import pytest

import weather_pipeline  # noqa: F401  (pyproj before eccodes; see weather_pipeline/__init__.py)

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not REAL_DIR.is_dir():
        pytest.fail(f"real NOAA test data not found at {REAL_DIR} (shared/ must sit beside the repo)")
    return REAL_DIR
