"""The prune_cache job on an ephemeral instance with a synthetic cache."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import format_run_key
from weather_pipeline.orchestration.resources import CacheResource
from weather_pipeline.orchestration.schedules import prune_cache_job, prune_cache_schedule


def _run_key(hours_ago: int) -> str:
    t = datetime.now(timezone.utc) - timedelta(hours=hours_ago)
    return format_run_key(t.replace(hour=t.hour - t.hour % 6))


def _put(layout: CacheLayout, model: str, run: str, nbytes: int = 1000) -> None:
    p = layout.grib_path(model, run, "t2m", 0)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x" * nbytes)
    t = layout.tile_path("conus", 0.25, model, run, "t2m", 0)
    t.parent.mkdir(parents=True, exist_ok=True)
    t.write_bytes(b"y" * nbytes)


def test_prune_removes_old_runs_and_their_partitions_but_not_busy_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("WEATHER_PIPELINE_RUN_HISTORY_DAYS", "0")
    layout = CacheLayout(tmp_path / "cache")
    old, busy_old, fresh = _run_key(24 * 10), _run_key(24 * 9), _run_key(7)
    for run in (old, busy_old, fresh):
        _put(layout, "hrrr", run)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [old, busy_old, fresh, "20000101_00"])
    # A finished run from earlier (history) and a queued ingest of the old-but-busy run.
    instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id="done-1", status=DagsterRunStatus.SUCCESS))
    instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id="queued-1", status=DagsterRunStatus.STARTED,
                                tags={"model": "hrrr", "run": busy_old, "task": "ingest_grib"}))
    stale = layout.root / "gribs" / ".tmp-crashed-writer"
    stale.write_bytes(b"z")
    import os

    os.utime(stale, (0, 0))

    result = prune_cache_job.execute_in_process(instance=instance, resources={"cache": CacheResource(root=str(layout.root))})
    assert result.success
    assert not layout.grib_run_dir("hrrr", old).exists()
    assert not layout.tile_run_dir("conus", 0.25, "hrrr", old).exists()
    assert layout.grib_run_dir("hrrr", busy_old).exists() and layout.grib_run_dir("hrrr", fresh).exists()
    partitions = set(instance.get_dynamic_partitions("hrrr_runs"))
    assert old not in partitions and "20000101_00" not in partitions  # also a partition with no files
    assert {busy_old, fresh} <= partitions
    (out,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    md = out.event_specific_data.metadata
    assert md["bytes_freed"].value == 2000
    assert [r["run"] for r in md["removed"].value] == [old]
    assert [r["run"] for r in md["protected"].value] == [busy_old]
    assert md["run_records_deleted"].value >= 1 and instance.get_run_by_id("done-1") is None
    assert instance.get_run_by_id("queued-1") is not None  # in-flight history is never deleted
    assert not stale.exists() and md["stale_temp_files_removed"].value == 1
    assert instance.get_run_by_id(result.run_id).tags["bytes_freed"] == "2000"


def test_prune_respects_the_disk_budget_oldest_first(tmp_path, monkeypatch):
    layout = CacheLayout(tmp_path / "cache")
    runs = [_run_key(h) for h in (30, 18, 6)]
    for run in runs:
        _put(layout, "gfs", run, nbytes=50_000)
    # Each run is 100 kB (GRIB + tile): a 250 kB budget holds two and a half.
    monkeypatch.setenv("WEATHER_PIPELINE_DISK_BUDGET_GB", str(250_000 / 1e9))
    instance = DagsterInstance.ephemeral()
    result = prune_cache_job.execute_in_process(instance=instance, resources={"cache": CacheResource(root=str(layout.root))})
    assert result.success
    assert [layout.grib_run_dir("gfs", r).exists() for r in runs] == [False, True, True]


def test_schedule_is_hourly_and_running_by_default():
    assert prune_cache_schedule.cron_schedule == "17 * * * *"
    assert prune_cache_schedule.default_status.value == "RUNNING"
