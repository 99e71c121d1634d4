"""ScanSource and tiles-follow-GRIBs sensors, called directly on an ephemeral instance."""

from datetime import datetime, timezone

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, build_sensor_context, materialize

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.core.scan import candidate_runs, load_availability
from weather_pipeline.orchestration import sensors
from weather_pipeline.orchestration.assets import grib_only
from weather_pipeline.orchestration.jobs import build_ingest_job, build_tile_job
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

NOW = datetime(2026, 5, 12, 2, 30, tzinfo=timezone.utc)  # the fixture's HRRR 00z run is 2.5 h old
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


@pytest.fixture()
def setup(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(sensors, "utcnow", lambda: NOW)
    model = load_catalog().model("hrrr")
    resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
                                    "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache")})
    scan = sensors.build_scan_source_sensor(model, build_ingest_job(model))
    instance = DagsterInstance.ephemeral()
    return model, resources, scan, instance, CacheLayout(tmp_path / "cache")


def _tick(sensor, instance, resources, cursor=None):
    ctx = build_sensor_context(instance=instance, resources=resources, cursor=cursor)
    return sensor(ctx)


def test_new_run_adds_its_partition_and_one_batched_request(setup, mirror):
    model, resources, scan, instance, layout = setup
    result = _tick(scan, instance, resources)
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "hrrr_runs" and list(add.partition_keys) == [HRRR_RUN]
    (req,) = result.run_requests
    assert req.tags[RANGE_START] == str(partition_key(HRRR_RUN, 0)) and req.tags[RANGE_END] == str(partition_key(HRRR_RUN, 2))
    assert req.tags["model"] == "hrrr" and req.tags["run"] == HRRR_RUN and req.tags["task"] == "ingest_grib"
    assert req.tags["dagster/priority"] == "98"  # 2 h old
    assert req.run_key == f"hrrr:{HRRR_RUN}:000-002:0"
    avail = load_availability(layout, "hrrr")[HRRR_RUN]
    assert avail.hours == (0, 1, 2) and avail.source == "mirror" and len(avail.expected) == 49
    # One listing request per run in the lookback (6 h of hourly HRRR runs), nothing else.
    listings = [r for r in mirror.request_log if "list-type=2" in r.query]
    assert len(listings) == len(mirror.request_log) == len(candidate_runs(model, NOW)) == 6


def test_only_hours_neither_materialized_nor_in_flight_are_requested(setup):
    model, resources, scan, instance, _ = setup
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    assert materialize(**grib_only(model), instance=instance, resources=resources,
                       partition_key=str(partition_key(HRRR_RUN, 0))).success
    (req,) = _tick(scan, instance, resources).run_requests
    assert (req.tags[RANGE_START], req.tags[RANGE_END]) == (str(partition_key(HRRR_RUN, 1)), str(partition_key(HRRR_RUN, 2)))
    instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id="inflight", status=DagsterRunStatus.STARTED,
                                tags={"model": "hrrr", "run": HRRR_RUN, "task": "ingest_grib",
                                      RANGE_START: str(partition_key(HRRR_RUN, 1)), RANGE_END: str(partition_key(HRRR_RUN, 2))}))
    result = _tick(scan, instance, resources)
    assert not result.run_requests


def test_repeatedly_failing_hours_are_left_to_gap_fill(setup):
    from dagster import Failure, asset

    model, resources, scan, instance, _ = setup
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    tags = {"model": "hrrr", "run": HRRR_RUN, "task": "ingest_grib", "dagster/partition": str(partition_key(HRRR_RUN, 1))}
    # runs that failed from outside their step (a killed worker, a stopped demo) are no attempts
    for i in range(sensors.MAX_AUTOMATIC_ATTEMPTS):
        instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id=f"killed-{i}", status=DagsterRunStatus.FAILURE,
                                    tags=tags))
    assert _tick(scan, instance, resources).run_requests

    @asset(name="hrrr_grib")
    def failing():
        raise Failure("the source said no")

    for _ in range(sensors.MAX_AUTOMATIC_ATTEMPTS):  # steps that ran and failed are
        materialize([failing], instance=instance, raise_on_error=False, tags=tags)
    result = _tick(scan, instance, resources)
    # Hours 0-2 form one batch that overlaps the failing hour: it has had its attempts.
    assert result.run_requests == []
    assert "hours 0-2: 3 failed runs, left to gap fill" in result.skip_reason.skip_message


def test_newer_runs_get_higher_priority():
    assert sensors.run_priority("20260512_02", NOW) > sensors.run_priority("20260512_00", NOW) > sensors.run_priority("20260501_00", NOW) >= 1
    assert sensors.GAP_FILL_PRIORITY < 1


def test_tiles_follow_new_grib_materializations_in_batches(setup):
    model, resources, _, instance, _ = setup
    follow = sensors.build_tiles_follow_gribs_sensor(model, build_tile_job(model))
    assert "no new GRIB" in _tick(follow, instance, resources).skip_message
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    assert materialize(**grib_only(model), instance=instance, resources=resources,
                       tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 2))}).success
    result = _tick(follow, instance, resources)
    (req,) = result.run_requests
    assert req.tags["task"] == "build_tile" and req.tags[RANGE_END] == str(partition_key(HRRR_RUN, 2))
    again = _tick(follow, instance, resources, cursor=result.cursor)
    assert "no new GRIB" in again.skip_message


def test_an_unreachable_source_is_recorded_as_such_and_what_was_known_is_kept(setup, tmp_path):
    """A dead source: the tick says so, keeps the last known availability, requests nothing."""
    import socket

    from weather_pipeline.core.http import reset_server_states
    from weather_pipeline.core.scan import load_source_health

    model, resources, scan, instance, layout = setup
    assert _tick(scan, instance, resources).run_requests  # the mirror answers: hours 0-2 known
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    reset_server_states()
    down = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": dead,
                               "WEATHER_PIPELINE_CACHE": str(layout.root), "WEATHER_PIPELINE_HTTP_BACKOFF_S": "0.01"})
    import time

    t0 = time.monotonic()
    result = _tick(scan, instance, down)
    assert time.monotonic() - t0 < 30
    assert not result.run_requests
    assert "SOURCE UNREACHABLE: mirror" in result.skip_reason.skip_message
    assert "connection refused" in result.skip_reason.skip_message
    assert load_availability(layout, "hrrr")[HRRR_RUN].hours == (0, 1, 2)
    assert not load_source_health(layout, "hrrr")["mirror"].reachable
    reset_server_states()


def test_a_refetch_ticket_requests_the_hour_again_even_when_materialized(setup):
    from weather_pipeline.core.repairs import open_ticket

    model, resources, scan, instance, layout = setup
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    for h in (0, 1, 2):
        assert materialize(**grib_only(model), instance=instance, resources=resources,
                           partition_key=str(partition_key(HRRR_RUN, h))).success
    assert not _tick(scan, instance, resources).run_requests  # everything is in
    open_ticket(layout, "hrrr", HRRR_RUN, 1, "refetch", "md5 changed on disk")
    (req,) = _tick(scan, instance, resources).run_requests
    assert req.tags[RANGE_START] == req.tags[RANGE_END] == str(partition_key(HRRR_RUN, 1))


def test_a_second_tick_asks_only_runs_that_can_still_change(setup, mirror):
    """Quiet scanner: runs past their publish window that were answered after it closed are not
    listed again for a while; runs still publishing are. Requests <= runs still publishing + 1."""
    model, resources, scan, instance, layout = setup
    first = _tick(scan, instance, resources)
    mirror.clear_log()
    second = _tick(scan, instance, resources, cursor=first.cursor)
    listed = sorted(r.query for r in mirror.request_log if "list-type=2" in r.query)
    runs = candidate_runs(model, NOW)
    publishing = [r for r in runs if (NOW - datetime.strptime(r, "%Y%m%d_%H").replace(tzinfo=timezone.utc)).total_seconds()
                  < model.publish_window_hours * 3600]
    assert 0 < len(publishing) < len(runs)
    assert len(mirror.request_log) == len(listed) == len(publishing)
    assert all(any(f"{r[:8]}" in q for q in listed) for r in publishing)
    # what was settled is still reported and saved, with its own age
    assert set(load_availability(layout, "hrrr")) >= set(runs)
    assert second.run_requests or second.skip_reason


def test_a_run_complete_at_the_source_is_never_listed_again():
    from weather_pipeline.core.scan import RunAvailability, format_checked_at, settled_availability

    model = load_catalog().model("hrrr")
    expected = tuple(range(19))
    long_ago = format_checked_at(datetime(2026, 5, 12, 0, 40, tzinfo=timezone.utc))
    saved = {
        "20260512_00": RunAvailability("hrrr", "20260512_00", "aws", expected, expected, long_ago),
        "20260512_01": RunAvailability("hrrr", "20260512_01", "aws", (0, 1), expected, long_ago),
        "20260512_02": RunAvailability("hrrr", "20260512_02", "aws", expected, expected, long_ago,
                                       unreachable=("aws",)),
    }
    settled = settled_availability(model, list(saved), saved, NOW)
    # complete: kept; incomplete and checked inside its window: asked again; unreachable: asked again
    assert set(settled) == {"20260512_00"}
