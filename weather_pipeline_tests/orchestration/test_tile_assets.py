"""The tile assets through Dagster: tiles, sidecars, run tiles, checks, change detection, retention."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance, materialize

from weather_pipeline.core.cache import CacheLayout, sidecar_path
from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.orchestration.assets import grib_only, tiles_only
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline_tests.mirror_fixtures import GFS_RUN, HRRR_RUN

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def _run(instance, assets, resources, run, first, last):
    """Materialize each selection in its own run, upstream first, as GRIBs fetched by hand and
    then tiled by the tiles sensor are. (The ingest job runs both in one step, hour by hour:
    `test_one_run_ingests_and_tiles_each_hour_as_it_lands`.)"""
    result = None
    for one in assets:
        result = materialize(
            **one, instance=instance, resources=resources, raise_on_error=False,
            tags={RANGE_START: str(partition_key(run, first)), RANGE_END: str(partition_key(run, last))},
        )
        if not result.success:
            return result
    return result


@pytest.fixture()
def env(mirror, tmp_path):
    def make(**extra):
        return resources_from_env({
            "WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
            "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache"), **extra,
        })
    return make, CacheLayout(tmp_path / "cache")


def test_hrrr_tiles_sidecars_run_tile_and_checks(env):
    make, layout = env
    model = load_catalog().model("hrrr")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    result = _run(instance, [grib_only(model), tiles_only(model)], make(WEATHER_PIPELINE_KEEP_GRIBS="hrrr"), HRRR_RUN, 0, 2)
    assert result.success

    tile = layout.tile_path("conus", 0.05, "hrrr", HRRR_RUN, "t2m", 1)
    with np.load(tile) as z:
        data, lat, lon = z["data"], z["lat"], z["lon"]
    assert data.dtype == np.float32 and data.shape == (lat.size, lon.size) == (521, 1181)
    assert lat[0] == 50.0 and lon[0] == -125.0 and lat.dtype == lon.dtype == np.float64
    meta = json.loads(sidecar_path(tile).read_text())
    assert {"source_grib_md5", "generated_at", "stats", "model", "run", "variable", "units", "region", "res", "method"} <= set(meta)
    assert meta["generated_at"].endswith("Z") and meta["res"] == 0.05 and meta["units"] == "K"
    assert 0 < meta["stats"]["nan_fraction"] < 0.05  # HRRR's Lambert domain leaves the box's corners empty
    assert meta["winds"] is None
    assert json.loads(sidecar_path(layout.tile_path("conus", 0.05, "hrrr", HRRR_RUN, "u10", 1)).read_text())["winds"].startswith("earth-relative")

    run_tile = layout.run_tile_path("kansas", 0.25, "hrrr", HRRR_RUN, "apcp")
    with np.load(run_tile) as z:
        assert list(z["hours"]) == [0, 1, 2] and z["data"].shape == (3, 13, 31)
        stacked = z["data"]
    hourly = [np.load(layout.tile_path("kansas", 0.25, "hrrr", HRRR_RUN, "apcp", h))["data"] for h in (0, 1, 2)]
    np.testing.assert_array_equal(stacked, np.stack(hourly))
    run_meta = json.loads(sidecar_path(run_tile).read_text())
    assert set(run_meta["source_grib_md5"]) == {"0", "1", "2"}

    mats = {m.partition: m.metadata for m in result.asset_materializations_for_node("hrrr_grib_and_tiles")}
    one = mats[str(partition_key(HRRR_RUN, 1))]
    assert one["tiles_built"].value == 18 and "data:image/png;base64," in one["preview"].value
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"sidecar_md5_matches_grib": True, "values_within_physical_bounds": True, "nan_fraction_under_threshold": True}
    # GRIBs are kept when asked (WEATHER_PIPELINE_KEEP_GRIBS), here for hrrr.
    assert layout.grib_path("hrrr", HRRR_RUN, "t2m", 1).is_file()


def test_unchanged_source_is_not_rebuilt_and_a_changed_one_is(env):
    make, layout = env
    model = load_catalog().model("gfs")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("gfs_runs", [GFS_RUN])
    resources = make(WEATHER_PIPELINE_KEEP_GRIBS="all")
    grib_asset, tile_asset = grib_only(model), tiles_only(model)
    assert _run(instance, [grib_asset, tile_asset], resources, GFS_RUN, 0, 1).success
    tile = layout.tile_path("west_europe", 0.25, "gfs", GFS_RUN, "t2m", 1)
    first = json.loads(sidecar_path(tile).read_text())["generated_at"]
    mtime = tile.stat().st_mtime_ns

    again = _run(instance, [tile_asset], resources, GFS_RUN, 1, 1)
    (m,) = again.asset_materializations_for_node("gfs_grib_and_tiles")
    assert m.metadata["status"].value.startswith("unchanged") and m.metadata["tiles_built"].value == 0
    assert tile.stat().st_mtime_ns == mtime

    # A GRIB changed on disk behind the ingest's back (here: t2m replaced by another hour's) is
    # never tiled: it goes to quarantine, the hour fails naming it, and a repair ticket asks for
    # it to be fetched again. The tile built from the verified bytes stays.
    grib_path = layout.grib_path("gfs", GFS_RUN, "t2m", 1)
    grib_path.unlink()
    grib_path.write_bytes(layout.grib_path("gfs", GFS_RUN, "t2m", 0).read_bytes())
    changed = _run(instance, [tile_asset], resources, GFS_RUN, 1, 1)
    assert not changed.success
    (failure,) = [e for e in changed.all_events if e.is_step_failure]
    assert "is not the GRIB the ingest verified" in failure.step_failure_data.user_failure_data.description
    assert not grib_path.exists() and layout.quarantine_path(grib_path).is_file()
    assert tile.stat().st_mtime_ns == mtime
    from weather_pipeline.core.repairs import open_tickets

    (ticket,) = open_tickets(layout, "gfs")
    assert (ticket.run, ticket.hour, ticket.kind) == (GFS_RUN, 1, "refetch")

    # A source that really changed (a new ingest recorded a new md5) is rebuilt.
    from dagster import AssetMaterialization
    from weather_pipeline.core.cache import md5_file

    grib_path.write_bytes(layout.grib_path("gfs", GFS_RUN, "t2m", 0).read_bytes())
    latest = instance.fetch_materializations(AssetKey("gfs_grib"), limit=10).records
    md5 = dict(next(r for r in latest if r.partition_key == str(partition_key(GFS_RUN, 1))).asset_materialization.metadata["md5"].value)
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key="gfs_grib", partition=str(partition_key(GFS_RUN, 1)), metadata={"md5": {**md5, "t2m": md5_file(grib_path)}}))
    rebuilt = _run(instance, [tile_asset], resources, GFS_RUN, 1, 1)
    assert rebuilt.success
    (m,) = rebuilt.asset_materializations_for_node("gfs_grib_and_tiles")
    assert m.metadata["tiles_built"].value >= 1
    assert json.loads(sidecar_path(tile).read_text())["generated_at"] >= first
    checks = {e.asset_check_key.name: e.passed for e in rebuilt.get_asset_check_evaluations()}
    assert checks["sidecar_md5_matches_grib"]


def test_gribs_are_retired_once_tiled_unless_kept(env):
    make, layout = env
    model = load_catalog().model("gfs")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("gfs_runs", [GFS_RUN])
    assert _run(instance, [grib_only(model), tiles_only(model)], make(), GFS_RUN, 0, 0).success
    assert layout.grib_paths_for_hour("gfs", GFS_RUN, 0) == {}
    (m,) = [x for x in instance.fetch_materializations(AssetKey("gfs_tiles"), limit=5).records]
    assert m.asset_materialization.metadata["gribs_deleted_bytes"].value > 0
    assert layout.tile_path("conus", 0.25, "gfs", GFS_RUN, "mslp", 0).is_file()
    # Re-running the tiles with the GRIBs gone keeps the tiles (nothing to rebuild from, nothing lost).
    again = _run(instance, [tiles_only(model)], make(), GFS_RUN, 0, 0)
    assert again.success
    assert instance.get_latest_asset_check_evaluation_record(AssetCheckKey(AssetKey("gfs_tiles"), "sidecar_md5_matches_grib")).event.asset_check_evaluation.passed


def test_tiles_without_gribs_fail_naming_the_missing_file(env):
    make, _ = env
    model = load_catalog().model("hrrr")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    result = _run(instance, [tiles_only(model)], make(), HRRR_RUN, 0, 0)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "no GRIB subset in the cache" in failure.step_failure_data.user_failure_data.description


def test_one_run_ingests_and_tiles_each_hour_as_it_lands(env):
    """The ingest job's shape: one run, one step, GRIB and tile materializations of every hour,
    the checks evaluated, and the tiles sensor leaves those hours alone."""
    from weather_pipeline.orchestration.assets import grib_and_tiles
    from weather_pipeline.orchestration.jobs import build_tile_job
    from weather_pipeline.orchestration.sensors import build_tiles_follow_gribs_sensor
    from dagster import build_sensor_context

    make, layout = env
    model = load_catalog().model("hrrr")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    result = materialize(**grib_and_tiles(model), instance=instance, resources=make(), raise_on_error=False,
                         tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 2))})
    assert result.success
    assert len({e.step_key for e in result.all_events if e.step_key}) == 1  # one step
    for asset in ("hrrr_grib", "hrrr_tiles"):
        got = {str(k) for k in instance.get_materialized_partitions(AssetKey(asset))}
        assert got == {str(partition_key(HRRR_RUN, h)) for h in (0, 1, 2)}, asset
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values()), checks
    assert layout.tile_path("conus", 0.05, "hrrr", HRRR_RUN, "t2m", 2).is_file()
    assert not layout.grib_paths_for_hour("hrrr", HRRR_RUN, 1)  # retired once tiled (catalog default)
    # the run's own tiles: nothing for the tiles sensor to do
    follow = build_tiles_follow_gribs_sensor(model, build_tile_job(model))
    # an ephemeral materialize runs as __ASSET_JOB with an asset selection of both keys
    out = follow(build_sensor_context(instance=instance, resources=make()))
    assert not out.run_requests, out.run_requests
