"""The demo's convergence machinery: abandoned runs released, its catalog overlay, the give-up rule."""

from __future__ import annotations

import os
import subprocess
import sys

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus

from weather_pipeline.core.catalog import _load
from weather_pipeline.demo import demo_catalog_overlay, release_abandoned_runs
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.sensors import failed_attempts
from weather_pipeline.core.catalog import load_catalog

RUN = "20260512_00"


def _started(instance, run_id: str, pid: int) -> DagsterRun:
    run = instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id=run_id, status=DagsterRunStatus.STARTED,
                                      tags={"model": "hrrr", "run": RUN, "task": "ingest_grib",
                                            "dagster/partition": str(partition_key(RUN, 1))}))
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run)
    return run


def test_runs_whose_worker_is_gone_are_released_and_live_ones_kept():
    instance = DagsterInstance.ephemeral()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _started(instance, "dead-worker", dead.pid)
    _started(instance, "live-worker", os.getpid())
    assert release_abandoned_runs(instance) == ["dead-worker"]
    assert instance.get_run_by_id("dead-worker").status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id("live-worker").status == DagsterRunStatus.STARTED
    # a run failed from outside its step is no attempt at its hours: the give-up rule ignores it
    assert failed_attempts(instance, load_catalog().model("hrrr"), RUN, [1]) == 0


def test_a_step_that_failed_counts_toward_giving_up():
    from dagster import Failure, asset, materialize

    @asset(name="hrrr_grib")
    def failing():
        raise Failure("the source said no")

    instance = DagsterInstance.ephemeral()
    result = materialize([failing], instance=instance, raise_on_error=False,
                         tags={"model": "hrrr", "run": RUN, "task": "ingest_grib",
                               "dagster/partition": str(partition_key(RUN, 1))})
    assert instance.get_records_for_run(result.run_id, of_type=DagsterEventType.STEP_FAILURE).records
    assert failed_attempts(instance, load_catalog().model("hrrr"), RUN, [1]) == 1
    assert failed_attempts(instance, load_catalog().model("hrrr"), RUN, [2]) == 0


def test_the_demo_overlay_gives_each_run_exactly_the_demo_hours(tmp_path):
    overlay = tmp_path / "demo-catalog.toml"
    overlay.write_text(demo_catalog_overlay({"hrrr": (RUN, [0, 1, 2, 3]), "gfs": ("20260512_06", [0, 1, 2, 3])}))
    catalog = _load(str(overlay))
    assert catalog.model("hrrr").hours_for_run("20260512_07") == (0, 1, 2, 3)
    assert catalog.model("hrrr").all_hours == (0, 1, 2, 3)
    assert catalog.model("gfs").hours_for_run("20260512_06") == (0, 1, 2, 3)
    assert catalog.model("gfs").run_hours == (0, 6, 12, 18)
