"""Deep-status computation on constructed facts."""

from datetime import datetime, timedelta, timezone

from weather_pipeline.core.status import (
    JobFacts,
    ModelPolicy,
    ModelRunFacts,
    QueueFacts,
    StatusInputs,
    compute_deep_status,
    inventory_entry,
    summary_text,
)

NOW = datetime(2026, 11, 22, 17, 0, tzinfo=timezone.utc)


def facts(**kw) -> ModelRunFacts:
    base = dict(model="hrrr", run="20261122_15", run_time=NOW - timedelta(hours=2), expected_hours=tuple(range(19)),
                grib_hours=frozenset(range(19)), tile_hours=frozenset(range(19)), source_hours=tuple(range(19)))
    return ModelRunFacts(**{**base, **kw})


def inputs(runs=(), queue=None, jobs=(), usage=None, budget=None) -> StatusInputs:
    return StatusInputs(
        now=NOW,
        queue=queue or QueueFacts(pending=1, active=2, failed_1h=0, finished_1h=10, max_concurrent_runs=4,
                                  daemon_heartbeat_age_s=10.0),
        model_runs=list(runs), jobs=list(jobs),
        disk_usage=usage or {"total_bytes": 100, "by_run": {"hrrr": {"20261122_15": 100}},
                             "cache_oldest": "2026-11-22T15:10:00.123456+00:00", "cache_newest": "2026-11-22T16:59:58+00:00"},
        disk_budget_bytes=budget, policies=[ModelPolicy("hrrr", 1, 3)],
    )


def test_complete_run_and_healthy_queue():
    doc = compute_deep_status(inputs([facts()]))
    assert doc["health"] == "healthy" and doc["alerts"] == []
    assert doc["inventory"][0] == {"model": "hrrr", "run": "20261122_15", "status": "complete", "hours_expected": 19,
                                   "expected_hours": list(range(19)), "hours_have": 19, "missing_hours": [], "source_hours": 19, "reason": None,
                                   "tiles_missing_hours": [], "tiles_have": 19, "damaged_hours": []}
    assert doc["queue"]["workers_online"] == doc["queue"]["workers_configured"] == 4
    assert doc["resources"]["cache_oldest"] == "2026-11-22T15:10:00Z"


def test_reasons_for_missing_hours():
    unpublished = inventory_entry(facts(grib_hours=frozenset(range(10)), tile_hours=frozenset(range(10)),
                                        source_hours=tuple(range(10))))
    assert (unpublished["status"], unpublished["missing_hours"][:2], unpublished["reason"]) == ("partial", [10, 11], "not yet published")
    failed = inventory_entry(facts(grib_hours=frozenset(range(17)), tile_hours=frozenset(range(17)),
                                   failed={17: "HTTP 503", 18: "HTTP 503"}))
    assert failed["status"] == "failed" and failed["reason"] == "GRIB download failed: HTTP 503"
    running = inventory_entry(facts(grib_hours=frozenset(range(17)), tile_hours=frozenset(range(17)),
                                    in_flight_hours=frozenset({17, 18})))
    assert running["status"] == "in_progress" and running["reason"] == "download queued or running"
    no_tiles = inventory_entry(facts(tile_hours=frozenset(range(18))))
    assert no_tiles["tiles_missing_hours"] == [18] and no_tiles["reason"] == "tile not built yet"
    nothing = inventory_entry(facts(grib_hours=frozenset(), tile_hours=frozenset(), source_hours=None))
    assert nothing["status"] == "missing" and nothing["reason"] == "source not checked yet" and nothing["source_hours"] is None


def test_alert_rules_and_health():
    q = QueueFacts(pending=0, active=0, failed_1h=6, finished_1h=10, max_concurrent_runs=4, daemon_heartbeat_age_s=400)
    old = facts(run="20261122_05", run_time=NOW - timedelta(hours=12), tile_hours=frozenset(range(18)))
    doc = compute_deep_status(inputs([old], queue=q, usage={"total_bytes": 95, "by_run": {}}, budget=100))
    codes = {a["code"]: a["level"] for a in doc["alerts"]}
    assert codes == {"daemon_heartbeat_stale": "critical", "failure_rate": "critical", "stale_data": "warning",
                     "disk_budget": "warning", "grib_without_tile": "warning"}
    assert doc["health"] == "unhealthy" and doc["queue"]["workers_online"] == 0 and not doc["queue"]["daemon_alive"]
    assert doc["queue"]["failure_rate_1h"] == 0.6
    mild = compute_deep_status(inputs([facts()], queue=QueueFacts(0, 0, 1, 10, 4, 5.0)))
    assert mild["health"] == "degraded" and [a["code"] for a in mild["alerts"]] == ["failure_rate"]
    down = compute_deep_status(inputs([facts()], queue=QueueFacts(0, 0, 0, 0, 4, None)))
    assert [a["code"] for a in down["alerts"]] == ["daemon_down"] and down["health"] == "unhealthy"


def test_job_entries_and_summary():
    job = JobFacts(run_id="abc", job="hrrr_ingest_grib", status="FAILURE",
                   tags={"task": "ingest_grib", "model": "hrrr", "run": "20261122_15", "dagster/priority": "98",
                         "dagster/asset_partition_range_start": "000|20261122_15",
                         "dagster/asset_partition_range_end": "003|20261122_15"},
                   created_at=NOW - timedelta(minutes=5), started_at=NOW - timedelta(minutes=4),
                   ended_at=NOW - timedelta(minutes=3), error="1 of 4 hrrr hours failed\nTraceback ...")
    doc = compute_deep_status(inputs([facts()], jobs=[job]))
    (j,) = doc["jobs"]
    assert (j["hours"], j["duration_s"], j["error"], j["priority"], j["task"]) == ("000-003", 60.0, "1 of 4 hrrr hours failed", 98, "ingest_grib")
    text = summary_text(doc)
    assert "health: HEALTHY" in text and "workers 4/4" in text and "hrrr  20261122_15  complete" in text


def test_an_unreachable_source_raises_an_alert_and_explains_missing_hours():
    from dataclasses import replace

    from weather_pipeline.core.status import SourceFacts

    down = SourceFacts("hrrr", "aws", False, "2026-11-22T16:59:00Z", "2026-11-22T16:40:00Z",
                       "cannot connect: connection refused", "2026-11-22T16:39:00Z")
    run = facts(grib_hours=frozenset(range(10)), tile_hours=frozenset(range(10)), source_hours=tuple(range(10)),
                unreachable="aws: cannot connect: connection refused")
    base = inputs([run])
    doc = compute_deep_status(replace(base, sources=[down]))
    alert = next(a for a in doc["alerts"] if a["code"] == "source_unreachable")
    assert alert["level"] == "critical" and "aws unreachable since 2026-11-22T16:40:00Z" in alert["message"]
    assert doc["health"] == "unhealthy"
    assert doc["inventory"][0]["reason"] == "source unreachable: aws: cannot connect: connection refused"
    assert doc["sources"][0]["reachable"] is False
    # With another source still answering it is a warning: work goes on.
    up = SourceFacts("hrrr", "nomads", True, "2026-11-22T16:59:00Z", "2026-11-22T10:00:00Z")
    doc = compute_deep_status(replace(base, sources=[down, up]))
    assert next(a for a in doc["alerts"] if a["code"] == "source_unreachable")["level"] == "warning"
    assert "source: hrrr aws UNREACHABLE" in summary_text(doc)


def test_damaged_hours_and_a_nearly_full_disk_raise_alerts():
    from dataclasses import replace

    from weather_pipeline.core.status import RepairFacts

    ticket = RepairFacts("hrrr", "20261122_15", 4, "refetch", "md5 changed", ("/c/gribs/hrrr/20261122_15/t2m/grib_004.grib2",))
    doc = compute_deep_status(replace(inputs([facts()]), repairs=[ticket], disk_free_bytes=10**9, min_free_bytes=2 * 10**9))
    codes = {a["code"]: a for a in doc["alerts"]}
    assert "grib_004.grib2" in codes["cache_damaged"]["message"] and codes["cache_damaged"]["level"] == "warning"
    assert codes["disk_low"]["level"] == "critical" and doc["resources"]["disk_free_bytes"] == 10**9
    assert doc["inventory"][0]["damaged_hours"] == [] and doc["repairs"][0]["hour"] == 4
    run = facts(damaged_hours=frozenset({4}))
    assert inventory_entry(run)["reason"] == "damaged in the cache, being repaired: hour(s) 4"
