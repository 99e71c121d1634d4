"""A damaged cache is found by the verify_cache checks, quarantined, and repaired by re-materialization."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, Definitions, materialize

from weather_pipeline.core.cache import CacheLayout, sidecar_path
from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.core.repairs import open_tickets
from weather_pipeline.orchestration.assets import grib_only, tiles_only
from weather_pipeline.orchestration.integrity import build_cache_checks, build_verify_cache_job
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


@pytest.fixture(params=["hrrr"])
def world(request, mirror, tmp_path, monkeypatch):
    import weather_pipeline.orchestration.integrity as integrity

    # the fixture's run is from 2026-05-12: pretend it is recent, so it is within retention
    real_recent = integrity._recent
    monkeypatch.setattr(integrity, "_recent", lambda keys, model, now: real_recent(
        keys, model, now.replace(year=2026, month=5, day=12, hour=6)))
    model = load_catalog().model("hrrr")
    resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
                                    "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache"), "WEATHER_PIPELINE_KEEP_GRIBS": request.param})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    grib, tiles = grib_only(model), tiles_only(model)
    for asset in (grib, tiles):
        assert materialize(**asset, instance=instance, resources=resources,
                           tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 1))}).success
    defs = Definitions(assets=grib["assets"], asset_checks=build_cache_checks(model),
                       jobs=[build_verify_cache_job([model])], resources=resources)
    return instance, defs, resources, (grib, tiles), CacheLayout(tmp_path / "cache")


def _verify(defs, instance, full=False):
    result = defs.resolve_job_def("verify_cache").execute_in_process(
        instance=instance, run_config={"ops": {name: {"config": {"full": full}} for name in (
            "hrrr_grib_gribs_match_ingest", "hrrr_tiles_tiles_match_sidecars")}})
    assert result.success
    return {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}


def test_a_clean_cache_passes_and_unchanged_files_are_not_read_again(world):
    instance, defs, _, _, _ = world
    first = _verify(defs, instance)
    assert first["gribs_match_ingest"].passed and first["tiles_match_sidecars"].passed
    assert first["gribs_match_ingest"].metadata["files_read"].value > 0
    again = _verify(defs, instance)
    assert again["gribs_match_ingest"].metadata["files_read"].value == 0
    assert _verify(defs, instance, full=True)["gribs_match_ingest"].metadata["files_read"].value > 0


def test_damaged_files_are_named_quarantined_and_repaired(world):
    instance, defs, resources, (grib, tiles), layout = world
    _verify(defs, instance)
    # by hand: a GRIB deleted, a tile's values altered (same size), a sidecar deleted
    lost = layout.grib_path("hrrr", HRRR_RUN, "mslp", 0)
    lost.unlink()
    tile = layout.tile_path("kansas", 0.25, "hrrr", HRRR_RUN, "t2m", 1)
    with np.load(tile) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["data"] = arrays["data"] + np.float32(5.0)
    tile.unlink()
    with open(tile, "wb") as fh:
        np.savez(fh, **arrays)
    side = sidecar_path(layout.tile_path("conus", 0.25, "hrrr", HRRR_RUN, "u10", 1))
    side.unlink()

    checks = _verify(defs, instance)
    gribs, tiled = checks["gribs_match_ingest"], checks["tiles_match_sidecars"]
    assert not gribs.passed and not tiled.passed
    grib_list = json.dumps(gribs.metadata["damaged"].value)
    tile_list = json.dumps(tiled.metadata["damaged"].value)
    assert str(lost) in grib_list and "missing" in grib_list
    assert str(tile) in tile_list and "the values changed" in tile_list
    assert str(side) in tile_list and "sidecar missing" in tile_list
    assert not tile.exists() and layout.quarantine_path(tile).is_file()  # out of the way
    tickets = {(t.hour, t.kind) for t in open_tickets(layout, "hrrr")}
    assert tickets == {(0, "refetch"), (1, "rebuild")}

    # Re-materialization repairs it: the GRIB hour fetched again, the tiles of hour 1 rebuilt.
    assert materialize(**grib, instance=instance, resources=resources,
                       partition_key=str(partition_key(HRRR_RUN, 0))).success
    assert materialize(**tiles, instance=instance, resources=resources,
                       tags={RANGE_START: str(partition_key(HRRR_RUN, 0)), RANGE_END: str(partition_key(HRRR_RUN, 1))}).success
    assert lost.is_file() and tile.is_file() and side.is_file()
    assert open_tickets(layout, "hrrr") == []
    after = _verify(defs, instance)
    assert after["gribs_match_ingest"].passed and after["tiles_match_sidecars"].passed
    materialized = instance.get_materialized_partitions(AssetKey("hrrr_tiles"))
    assert str(partition_key(HRRR_RUN, 1)) in materialized


@pytest.mark.parametrize("world", [""], indirect=True)
def test_retired_gribs_are_not_damage_but_a_damaged_tile_then_needs_a_refetch(world):
    instance, defs, _, _, layout = world
    assert layout.grib_paths_for_hour("hrrr", HRRR_RUN, 1) == {}  # retired once tiled (the default)
    checks = _verify(defs, instance)
    assert checks["gribs_match_ingest"].passed and checks["tiles_match_sidecars"].passed
    tile = layout.tile_path("conus", 0.05, "hrrr", HRRR_RUN, "apcp", 1)
    tile.write_bytes(b"not a tile")
    assert not _verify(defs, instance)["tiles_match_sidecars"].passed
    (ticket,) = open_tickets(layout, "hrrr")
    assert (ticket.hour, ticket.kind) == (1, "refetch")  # no GRIB left to rebuild from
