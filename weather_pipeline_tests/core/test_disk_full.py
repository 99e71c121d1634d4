"""A full disk (ENOSPC) during ingest and tile building, on a small tmpfs as the cache root.

A clear failure naming the file, nothing partial, no good file lost; prune still frees space and
the deep status raises disk_low.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from weather_pipeline.core.cache import CacheLayout, CacheWriteError, md5_file
from weather_pipeline.core.http import HttpClient, HttpConfig, RetryPolicy
from weather_pipeline.core.ingest import ingest_hour, is_transient
from weather_pipeline.core.prune import execute_prune, plan_prune, runs_on_disk
from weather_pipeline.core.sources import SourceSettings
from weather_pipeline.core.tiles import build_hour
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

NOW = datetime(2026, 5, 12, 12, tzinfo=timezone.utc)


@pytest.fixture()
def small_disk(tmp_path):
    """Mount a tmpfs of the requested size at a fresh directory (root, as on this machine kind)."""
    mounted: list[Path] = []

    def make(size_bytes: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _client() -> HttpClient:
    return HttpClient(HttpConfig(retry=RetryPolicy(max_attempts=2, initial_wait=0.01, jitter=0)))


def _ingest(mirror, cache: CacheLayout, hour: int):
    settings = SourceSettings(order=("mirror",), mirror_url=mirror.url)
    return ingest_hour("hrrr", HRRR_RUN, hour, cache=cache, client=_client(), settings=settings, now=NOW)


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): md5_file(p) for p in root.rglob("*.grib2")} | \
           {str(p.relative_to(root)): md5_file(p) for p in root.rglob("*.npz")}


def test_a_full_disk_fails_the_ingest_clearly_and_keeps_the_good_hour(mirror, tmp_path, small_disk):
    # Measure one hour's subsets, then give the cache room for about one and a half hours.
    probe = _ingest(mirror, CacheLayout(tmp_path / "probe"), 0)
    root = small_disk(int(probe.message_bytes * 1.5))
    cache = CacheLayout(root)
    _ingest(mirror, cache, 0)
    good = _snapshot(root)
    with pytest.raises(CacheWriteError) as info:
        _ingest(mirror, cache, 1)
    message = str(info.value)
    assert "cannot write" in message and "the disk is full" in message and "bytes free" in message
    assert str(root) in message and "grib_001.grib2" in message
    assert not is_transient(info.value)
    # nothing partial: hour 1 has no file at all, and no temp file is left behind
    assert cache.grib_paths_for_hour("hrrr", HRRR_RUN, 1) == {}
    assert _temp_files(root) == []
    # no good file lost
    assert _snapshot(root) == good


def test_a_full_disk_fails_the_tile_build_without_partial_tiles(mirror, tmp_path, small_disk):
    probe = _ingest(mirror, CacheLayout(tmp_path / "probe"), 0)
    build_hour("hrrr", HRRR_RUN, 0, CacheLayout(tmp_path / "probe"), regions=["kansas"])
    tiles_bytes = sum(p.stat().st_size for p in (tmp_path / "probe" / "tiles").rglob("*") if p.is_file())
    weights = sum(p.stat().st_size for p in (tmp_path / "probe" / "weights").rglob("*") if p.is_file())
    # room for two hours of GRIBs and the weights, and half an hour of conus tiles
    root = small_disk(int(2 * probe.message_bytes + weights + tiles_bytes * 2 + (1 << 20)))
    cache = CacheLayout(root)
    for hour in (0, 1):
        _ingest(mirror, cache, hour)
    build_hour("hrrr", HRRR_RUN, 0, cache, regions=["kansas"])
    good = _snapshot(root)
    with pytest.raises(CacheWriteError, match="the disk is full"):
        build_hour("hrrr", HRRR_RUN, 1, cache)  # every region: conus 0.05 deg does not fit
    assert _temp_files(root) == []
    for path in (root / "tiles").rglob("tile_001.npz"):
        assert path.with_suffix(".meta.json").is_file(), f"{path} has no sidecar: a partial tile"
    assert {k: v for k, v in _snapshot(root).items() if k in good} == good


def test_prune_still_frees_a_full_disk_and_the_status_says_so(mirror, tmp_path, small_disk, monkeypatch):
    from weather_pipeline.core.status import DEFAULT_MIN_FREE_BYTES

    probe = _ingest(mirror, CacheLayout(tmp_path / "probe"), 0)
    root = small_disk(int(probe.message_bytes * 1.5))
    cache = CacheLayout(root)
    _ingest(mirror, cache, 0)
    filler = root / "filler.bin"
    with open(filler, "wb") as fh:  # fill the rest of the disk to the last byte
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    assert shutil.disk_usage(root).free < 65536
    assert cache.free_bytes() is not None and cache.free_bytes() < DEFAULT_MIN_FREE_BYTES
    # The deep status says so, and its writer survives being unable to write deep.json.
    from dagster import DagsterInstance, build_sensor_context

    from weather_pipeline.orchestration.resources import CacheResource
    from weather_pipeline.orchestration.status import deep_status, deep_status_sensor

    instance = DagsterInstance.ephemeral()
    alert = next(a for a in deep_status(instance, cache)["alerts"] if a["code"] == "disk_low")
    assert alert["level"] == "critical"
    tick = deep_status_sensor(build_sensor_context(instance=instance, resources={"cache": CacheResource(root=str(root))}))
    assert "deep status not written" in tick.skip_message and "the disk is full" in tick.skip_message
    plan = plan_prune(runs_on_disk(cache), now=datetime(2026, 5, 20, tzinfo=timezone.utc),
                      retention_hours={"hrrr": 48}, budget_bytes=None, busy=set())
    result = execute_prune(cache, plan)
    assert [r.run for r in result.removed] == [HRRR_RUN] and not result.errors
    assert result.bytes_freed >= probe.message_bytes * 0.9
    assert not cache.grib_run_dir("hrrr", HRRR_RUN).exists()
    os.remove(filler)
