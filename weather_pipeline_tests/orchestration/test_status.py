"""Deep status from real run storage after real in-process runs; the JSON Schema holds."""

import json
from pathlib import Path

import jsonschema
import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, build_sensor_context, materialize

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.orchestration.assets import grib_only, tiles_only
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline.orchestration.status import deep_status, deep_status_sensor
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "weather_pipeline/status/deep_status.schema.json").read_text())
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


@pytest.fixture()
def stack():
    from contextlib import ExitStack

    with ExitStack() as s:
        yield s


@pytest.fixture()
def world(mirror, tmp_path, monkeypatch, stack):
    """HRRR hours 0-1 ingested and tiled, hour 3 failed (not published), one run waiting in the queue."""
    from datetime import datetime, timezone

    from weather_pipeline.orchestration import status as status_mod

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 5, 12, 3, 0, tzinfo=timezone.utc)

    monkeypatch.setattr(status_mod, "datetime", Frozen)
    resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
                                    "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache"), "WEATHER_PIPELINE_KEEP_GRIBS": "all"})
    model = load_catalog().model("hrrr")
    import yaml
    from dagster import instance_for_test

    overrides = yaml.safe_load((Path(__file__).resolve().parents[2] / "dagster.yaml").read_text())
    (tmp_path / "home").mkdir()
    instance = stack.enter_context(instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "home")))
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    assets = [grib_only(model), tiles_only(model)]
    for one, task in zip(assets, ("ingest_grib", "build_tile")):  # the ingest run, then the tile run
        ok = materialize(**one, instance=instance, resources=resources,
                         tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 1)),
                               "model": "hrrr", "run": HRRR_RUN, "task": task})
        assert ok.success
    bad = materialize(**assets[0], instance=instance, resources=resources, raise_on_error=False,
                      tags={"dagster/partition": str(partition_key(HRRR_RUN, 3)), "model": "hrrr", "run": HRRR_RUN,
                            "task": "ingest_grib"}, partition_key=str(partition_key(HRRR_RUN, 3)))
    assert not bad.success
    # A run waiting in the queue (NOT_STARTED: a QUEUED record needs a code location origin).
    instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id="waiting-1", status=DagsterRunStatus.NOT_STARTED,
                                tags={"model": "hrrr", "run": HRRR_RUN, "task": "ingest_grib",
                                      "dagster/partition": str(partition_key(HRRR_RUN, 2))}))
    return instance, CacheLayout(tmp_path / "cache"), bad.run_id


def test_statuses_from_real_run_storage(world):
    instance, layout, failed_run = world
    doc = deep_status(instance, layout)
    jsonschema.validate(doc, SCHEMA)
    q = doc["queue"]
    assert (q["pending"], q["active"], q["failed_1h"]) == (1, 0, 1) and q["finished_1h"] == 3  # ingest, tiles, failed
    assert q["workers_configured"] == 4 and q["workers_online"] == 0  # no daemon in this test
    (entry,) = [e for e in doc["inventory"] if e["run"] == HRRR_RUN]
    assert entry["hours_have"] == 2 and entry["missing_hours"][:2] == [2, 3] and entry["hours_expected"] == 49
    assert entry["status"] == "in_progress"  # hour 2 waits in the queue
    failed_job = next(j for j in doc["jobs"] if j["run_id"] == failed_run)
    assert failed_job["status"] == "FAILURE" and "003|20260512_00" in failed_job["error"]
    assert failed_job["hours"] == "003" and failed_job["task"] == "ingest_grib"
    assert doc["resources"]["disk_bytes"]["hrrr"][HRRR_RUN] > 0
    assert {a["code"] for a in doc["alerts"]} >= {"daemon_down", "failure_rate"} and doc["health"] == "unhealthy"


def test_reason_names_the_failure_when_nothing_is_queued(world):
    instance, layout, _ = world
    instance.delete_run("waiting-1")
    (entry,) = [e for e in deep_status(instance, layout)["inventory"] if e["run"] == HRRR_RUN]
    assert entry["status"] == "failed"
    # the hour's own reason from the batch's failure record, not the batch's summary line
    assert entry["reason"].startswith("GRIB download failed: HourNotPublished: hrrr run 20260512_00 hour 3 is not published")


def test_sensor_writes_the_document_atomically(world):
    instance, layout, _ = world
    from weather_pipeline.orchestration.resources import CacheResource

    result = deep_status_sensor(build_sensor_context(instance=instance, resources={"cache": CacheResource(root=str(layout.root))}))
    assert "wrote" in result.skip_message
    doc = json.loads(layout.deep_status_path.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert not [p for p in layout.deep_status_path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_example_document_matches_the_schema():
    example = json.loads((Path(__file__).resolve().parents[2] / "weather_pipeline/status/example_deep.json").read_text())
    jsonschema.validate(example, SCHEMA)
    broken = {**example, "health": "fine"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_a_run_failed_from_outside_shows_the_real_cause():
    """A launch that timed out: Dagster logs the cause in an engine event, then a generic failure."""
    import sys

    from dagster import DagsterRun, DagsterRunStatus
    from dagster._core.events import EngineEventData
    from dagster._utils.error import serializable_error_info_from_exc_info

    from weather_pipeline.orchestration.status import _read_failure

    instance = DagsterInstance.ephemeral()
    run = instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id="launch-failed", status=DagsterRunStatus.NOT_STARTED))
    try:
        raise TimeoutError("User code server request timed out due to taking longer than 60 seconds to complete.")
    except TimeoutError:
        error = serializable_error_info_from_exc_info(sys.exc_info())
    instance.report_engine_event("Caught an unrecoverable error while dequeuing the run", run,
                                 EngineEventData.engine_error(error))
    instance.report_run_failed(run)
    line, _ = _read_failure(instance, "launch-failed")
    assert "User code server request timed out" in line and "from outside" not in line
