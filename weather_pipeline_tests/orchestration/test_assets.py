"""The GRIB assets through Dagster, in process, on an ephemeral instance."""

from __future__ import annotations

import pytest
from dagster import AssetKey, DagsterInstance, MultiPartitionKey, materialize

from weather_pipeline.core.catalog import InvalidRequest, load_catalog
from weather_pipeline.orchestration.assets import grib_only
from weather_pipeline.orchestration.partitions import model_partitions, parse_partition_key, partition_key
from weather_pipeline.orchestration.resources import parse_rate_limits, resources_from_env
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def test_definitions_load_one_grib_asset_per_catalog_model():
    from weather_pipeline.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {f"{m}_grib" for m in load_catalog().models} <= keys


def test_partitions_are_run_by_hour_with_the_documented_key_form():
    pdef = model_partitions(load_catalog().model("hrrr"))
    assert {d.name for d in pdef.partitions_defs} == {"run", "hour"}
    key = partition_key("20260512_00", 6)
    assert str(key) == "006|20260512_00"  # the CLI form documented in the README
    assert parse_partition_key(key) == parse_partition_key("006|20260512_00") == ("20260512_00", 6)
    with pytest.raises(InvalidRequest, match="malformed partition key"):
        parse_partition_key("20260512_00|006")


def _resources(mirror, tmp_path):
    return resources_from_env(
        {"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
         "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache")}
    )


def test_a_range_of_hours_is_one_run_with_metadata_per_partition(mirror, tmp_path):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    asset = grib_only(load_catalog().model("hrrr"))
    result = materialize(
        **asset, instance=instance, resources=_resources(mirror, tmp_path),
        tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 2))},
    )
    assert result.success
    mats = result.asset_materializations_for_node("hrrr_grib_and_tiles")
    assert sorted(m.partition for m in mats) == [str(partition_key(HRRR_RUN, h)) for h in (0, 1, 2)]
    by_hour = {parse_partition_key(m.partition)[1]: m.metadata for m in mats}
    assert by_hour[0]["md5"].value != by_hour[1]["md5"].value  # per-partition, not shared
    assert set(by_hour[1]["md5"].value) == {"t2m", "u10", "v10", "apcp", "refc", "mslp"}
    assert by_hour[1]["source_url"].value.endswith("hrrr.t00z.wrfsfcf01.grib2")
    assert by_hour[1]["requests"].value >= 2 and by_hour[1]["bytes_fetched"].value > 0
    assert (tmp_path / "cache/gribs/hrrr" / HRRR_RUN / "t2m/grib_002.grib2").is_file()
    status = instance.get_status_by_partition(AssetKey("hrrr_grib"), [str(partition_key(HRRR_RUN, h)) for h in (0, 1, 2)], model_partitions(load_catalog().model("hrrr")))
    assert set(status.values()) == {status[str(partition_key(HRRR_RUN, 0))]} and len(status) == 3


def test_an_hour_outside_the_run_fails_naming_it(mirror, tmp_path):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", ["20260512_01"])
    asset = grib_only(load_catalog().model("hrrr"))
    result = materialize(
        **asset, instance=instance, resources=_resources(mirror, tmp_path),
        partition_key=str(MultiPartitionKey({"run": "20260512_01", "hour": "030"})), raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.description == (
        "forecast hour 30 is outside hrrr's range for a 01z run (0-18)"
    )
    assert not (tmp_path / "cache").exists()


def test_an_unpublished_hour_fails_the_batch_and_names_the_hour(mirror, tmp_path):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    asset = grib_only(load_catalog().model("hrrr"))
    result = materialize(
        **asset, instance=instance, resources=_resources(mirror, tmp_path),
        tags={RANGE_START: str(partition_key(HRRR_RUN, 2)), RANGE_END: str(partition_key(HRRR_RUN, 3))},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("1 of 2 hrrr hours failed (IngestGrib): 003|20260512_00: HourNotPublished")
    # Not transient: the hour is not tried again (that is for network trouble).
    assert not any("trying them again" in (e.message or "") for e in instance.all_logs(result.run_id))
    assert (tmp_path / "cache/gribs/hrrr" / HRRR_RUN / "t2m/grib_002.grib2").is_file()  # the good hour is kept
    # ... and recorded as materialized with its metadata, so it is neither fetched again nor missing
    keys = [str(partition_key(HRRR_RUN, h)) for h in (2, 3)]
    status = instance.get_status_by_partition(AssetKey("hrrr_grib"), keys, model_partitions(load_catalog().model("hrrr")))
    assert {k: v.value for k, v in status.items()} == {keys[0]: "MATERIALIZED", keys[1]: "FAILED"}
    (rec,) = instance.fetch_materializations(AssetKey("hrrr_grib"), limit=10).records
    assert rec.partition_key == keys[0] and set(rec.asset_materialization.metadata["md5"].value) >= {"t2m", "u10"}
    assert failure.step_failure_data.user_failure_data.metadata["failed"].value == {
        keys[1]: description.split(f"{keys[1]}: ", 1)[1]}


def test_a_retried_batch_does_not_fetch_again_what_an_earlier_attempt_committed(mirror, tmp_path):
    """A transient failure: only the failed hour is tried again; the hours that landed are kept."""
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    asset = grib_only(load_catalog().model("hrrr"), retry_delays_s=(0.01,))
    # hour 1's .idx fails more often than the client retries (2 attempts): one step failure
    mirror.faults.add("*wrfsfcf01.grib2.idx", "status", code=503, times=2)
    resources = resources_from_env({
        "WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
        "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache"), "WEATHER_PIPELINE_HTTP_ATTEMPTS": "2",
        "WEATHER_PIPELINE_HTTP_BACKOFF_S": "0.01"})
    result = materialize(
        **asset, instance=instance, resources=resources, raise_on_error=False,
        tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 2))},
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert any("trying them again" in (e.message or "") for e in instance.all_logs(result.run_id))
    # every hour materialized exactly once: the retry fetched only hour 1
    recs = instance.fetch_materializations(AssetKey("hrrr_grib"), limit=10).records
    assert sorted(r.partition_key for r in recs) == sorted(str(partition_key(HRRR_RUN, h)) for h in (0, 1, 2))
    grib_gets = [r for r in mirror.request_log if r.path.endswith(".grib2") and r.method == "GET"]
    per_hour = {h: sum(1 for r in grib_gets if f"wrfsfcf{h:02d}" in r.path) for h in (0, 1, 2)}
    assert per_hour[0] == per_hour[2] > 0 and per_hour[1] == per_hour[0], per_hour
    idx_gets = [r for r in mirror.request_log if r.path.endswith(".idx")]
    assert sum(1 for r in idx_gets if "wrfsfcf00" in r.path) == 1  # hour 0 was not asked again


def test_resources_come_from_the_environment():
    res = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": "http://127.0.0.1:1",
                              "WEATHER_PIPELINE_RATE_LIMITS": "127.0.0.1=30"})
    cfg = res["noaa"].http_config()
    assert cfg.rate_limits == {"127.0.0.1": 30}
    default = resources_from_env({})["noaa"].http_config()
    assert default.rate_limits == {"nomads.ncep.noaa.gov": 110}  # NOMADS is always limited
    assert parse_rate_limits("a=1, b=2") == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="bad rate limit 'a=x'"):
        parse_rate_limits("a=x")
