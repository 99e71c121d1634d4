"""Shared fixtures. Importing weather_pipeline first sets up native-library load order."""

from __future__ import annotations

from pathlib import Path

import pytest

import weather_pipeline  # noqa: F401  (pyproj before eccodes; see weather_pipeline/__init__.py)

from weather_pipeline_tests.testdata import REAL_DIR


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not REAL_DIR.is_dir():
        pytest.fail(f"real NOAA test data not found at {REAL_DIR} (shared/ must sit beside the repo)")
    return REAL_DIR


@pytest.fixture(scope="session")
def mirror_root(tmp_path_factory) -> Path:
    """A NOAA-identical tree with one HRRR run (f00-f02) and one GFS run (f000-f001)."""
    from weather_pipeline_tests.mirror_fixtures import build_mirror

    return build_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture()
def mirror(mirror_root):
    """The shared mirror served on a free loopback port; faults and log are fresh per test."""
    from weather_pipeline.mirror.server import MirrorServer

    with MirrorServer(mirror_root) as server:
        yield server
