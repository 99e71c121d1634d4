"""The Python API for weather users, on the mirror: fetch, build, open as xarray, list."""

from __future__ import annotations

import numpy as np
import pytest

import weather_pipeline.api as wp
from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.tiles import build_hour, update_run_tile
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN


@pytest.fixture()
def cache(mirror, tmp_path):
    layout = CacheLayout(tmp_path / "cache")
    for hour in (0, 1, 2):
        report = wp.fetch_hour("hrrr", HRRR_RUN, hour, cache=layout, sources="mirror", mirror_url=mirror.url)
        assert {v.variable for v in report.variables} >= {"t2m", "u10"}
        build_hour("hrrr", HRRR_RUN, hour, layout, regions=["kansas"])
    update_run_tile(layout, "kansas", 0.25, "hrrr", HRRR_RUN, "t2m")
    return layout


def test_an_hourly_tile_opens_with_valid_time_lat_lon_and_its_sidecar(cache):
    ds = wp.open_tile(cache.root, "kansas", 0.25, "hrrr", HRRR_RUN, "t2m", hour=2)
    da = ds["t2m"]
    assert da.dims == ("lat", "lon") and da.attrs["units"] == "K"
    assert str(ds["time"].values)[:16] == "2026-05-12T02:00" and str(ds["reference_time"].values)[:13] == "2026-05-12T00"
    assert float(ds["lat"][0]) == 40.0 and float(ds["lon"][0]) == -102.0  # north first, west first
    with np.load(cache.tile_path("kansas", 0.25, "hrrr", HRRR_RUN, "t2m", 2)) as z:
        assert np.array_equal(da.values, z["data"], equal_nan=True)
    assert ds.attrs["region"] == "kansas" and len(ds.attrs["source_grib_md5"]) == 32
    assert ds.attrs["stats_min"] == pytest.approx(float(np.nanmin(da.values)))
    assert 180 < float(da.sel(lat=39.0, lon=-97.0, method="nearest")) < 340


def test_a_run_tile_has_a_time_dimension(cache):
    ds = wp.open_run_tile(cache, "kansas", 0.25, "hrrr", HRRR_RUN, "t2m")
    assert ds["t2m"].dims == ("time", "lat", "lon") and ds.sizes["time"] == 3
    assert [str(t)[:13] for t in ds["time"].values] == ["2026-05-12T00", "2026-05-12T01", "2026-05-12T02"]
    one = wp.open_tile(cache, "kansas", 0.25, "hrrr", HRRR_RUN, "t2m", hour=1)
    np.testing.assert_array_equal(ds["t2m"].sel(time="2026-05-12T01:00").values, one["t2m"].values)


def test_the_cache_listing_and_clear_errors(cache):
    entries = wp.list_cache(cache)
    kinds = {e.kind for e in entries}
    assert kinds == {"grib", "tile", "run_tile"}
    gribs = [e for e in entries if e.kind == "grib" and e.variable == "t2m"]
    assert [e.hour for e in gribs] == [0, 1, 2] and all(e.bytes > 0 for e in gribs)
    assert any(e.kind == "run_tile" and e.region == "kansas" and e.res == 0.25 for e in entries)
    with pytest.raises(FileNotFoundError, match="no tile .*tile_007.npz"):
        wp.open_tile(cache, "kansas", 0.25, "hrrr", HRRR_RUN, "t2m", hour=7)


def test_inventory_reads_the_idx_of_the_first_source_that_has_it(mirror):
    (entry,) = wp.inventory("hrrr", HRRR_RUN, 1, sources="mirror", mirror_url=mirror.url, search=":TMP:2 m above ground:")
    assert entry.variable == "TMP" and entry.forecast == "1 hour fcst"
    from weather_pipeline.core.ingest import HourNotPublished

    with pytest.raises(HourNotPublished, match="no .idx"):
        wp.inventory("hrrr", HRRR_RUN, 5, sources="mirror", mirror_url=mirror.url)
