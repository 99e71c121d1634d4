"""Regridding geometry and exactness on the real NOAA GRIB files."""

from __future__ import annotations

import eccodes
import numpy as np
import pytest

from weather_pipeline.core.regrid import (
    RegridError,
    SourceGrid,
    TargetGrid,
    cached_weights,
    compute_weights,
)

HRRR = "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2"
GFS = "gfs.20210509.t06z.pgrb2.1p00.f000.10u.grib2"
KEYS = sorted(set(SourceGrid.LAMBERT_KEYS + SourceGrid.LATLON_KEYS))


def _load(path):
    with open(path, "rb") as fh:
        h = eccodes.codes_grib_new_from_file(fh)
    try:
        keys = {k: eccodes.codes_get(h, k) for k in KEYS if eccodes.codes_is_defined(h, k)}
        ny, nx = keys["Ny"], keys["Nx"]
        values = eccodes.codes_get_values(h).reshape(ny, nx).astype(np.float32)
        lats = eccodes.codes_get_array(h, "latitudes").reshape(ny, nx)
        lons = eccodes.codes_get_array(h, "longitudes").reshape(ny, nx)
    finally:
        eccodes.codes_release(h)
    return SourceGrid(keys), values, lats, lons


@pytest.fixture(scope="module")
def hrrr(real_dir):
    return _load(real_dir / HRRR)


@pytest.fixture(scope="module")
def gfs(real_dir):
    return _load(real_dir / GFS)


def test_target_grid_uses_integer_steps_north_to_south():
    t = TargetGrid(-125.0, 24.0, -66.0, 50.0, 0.05)
    assert t.shape == (521, 1181)
    assert t.lons[0] == -125.0 and abs(t.lons[-1] - -66.0) < 1e-9
    assert t.lats[0] == 50.0 and abs(t.lats[-1] - 24.0) < 1e-9
    assert np.all(np.diff(t.lats) < 0) and np.all(np.diff(t.lons) > 0)
    # Index arithmetic, not repeated addition: every step is the same float computation.
    assert t.lons[777] == -125.0 + 777 * 0.05


@pytest.mark.parametrize("bbox", ["-100,35,-95", "a,b,c,d", "10,35,-10,40", "-100,40,-95,35", "-190,0,0,10"])
def test_bad_bbox_is_named(bbox):
    with pytest.raises(RegridError, match="bbox"):
        TargetGrid.parse_bbox(bbox, 0.25)


def test_pyproj_hrrr_coordinates_match_eccodes_at_every_point(hrrr):
    src, _, lats, lons = hrrr
    fi, fj = src.fractional_index(lats.ravel(), lons.ravel())
    jj, ii = np.indices(src.shape)
    err = np.hypot(fi - ii.ravel(), fj - jj.ravel())
    # In grid cells (3 km): the projection agrees with eccodes' own coordinates to ~1e-11 cells.
    assert err.max() < 1e-6, err.max()


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("bbox", [(-10.0, 30.0, 10.0, 50.0), (100.0, -20.0, 140.0, 10.0), (-180.0, -90.0, 179.0, 90.0)])
def test_grid_aligned_bbox_reproduces_gfs_exactly(gfs, method, bbox):
    src, values, _, _ = gfs
    t = TargetGrid(*bbox, 1.0)
    out = compute_weights(src, t, method).apply(values)
    rows = np.rint(90.0 - t.lats).astype(int)
    cols = np.rint(np.mod(t.lons, 360.0)).astype(int)
    np.testing.assert_array_equal(out, values[np.ix_(rows, cols)])


def test_bilinear_lies_within_its_four_neighbours(hrrr):
    src, values, _, _ = hrrr
    t = TargetGrid(-110.0, 30.0, -80.0, 45.0, 0.073)
    w = compute_weights(src, t, "bilinear")
    out = w.apply(values).ravel()[w.valid]
    neighbours = values.ravel()[w.index]
    assert np.all(out >= neighbours.min(axis=0) - 1e-4) and np.all(out <= neighbours.max(axis=0) + 1e-4)
    assert np.isfinite(out).all() and out.size > 10_000


def test_points_outside_the_source_are_nan(hrrr):
    src, values, _, _ = hrrr
    t = TargetGrid(-170.0, 0.0, -20.0, 70.0, 1.0)  # far larger than CONUS
    out = compute_weights(src, t, "bilinear").apply(values)
    assert np.isnan(out[0, 0]) and np.isnan(out[-1, -1])
    assert np.isfinite(out[t.lats.tolist().index(40.0), t.lons.tolist().index(-100.0)])


def test_masked_points_are_nan_but_do_not_spoil_exact_neighbours(gfs):
    src, values, _, _ = gfs
    masked = values.copy()
    masked[40, 0] = np.nan  # 50 N, 0 E
    exact = compute_weights(src, TargetGrid(-2.0, 48.0, 2.0, 52.0, 1.0), "bilinear").apply(masked)
    assert np.isnan(exact[2, 2]) and np.isfinite(exact[2, 3]) and exact[2, 3] == values[40, 1]
    between = compute_weights(src, TargetGrid(0.5, 49.5, 1.5, 50.5, 1.0), "bilinear").apply(masked)
    assert np.isnan(between[0, 0])


def test_weights_are_cached_per_grid_target_and_method(tmp_path, gfs):
    src, values, _, _ = gfs
    t = TargetGrid(-10.0, 30.0, 10.0, 50.0, 0.5)
    w1, hit1 = cached_weights(tmp_path, src, t)
    w2, hit2 = cached_weights(tmp_path, src, t)
    assert (hit1, hit2) == (False, True)
    np.testing.assert_array_equal(w1.apply(values), w2.apply(values))
    _, hit3 = cached_weights(tmp_path, src, t, "nearest")
    moved = SourceGrid({**src.keys, "longitudeOfFirstGridPointInDegrees": 0.5})
    _, hit4 = cached_weights(tmp_path, moved, t)
    assert (hit3, hit4) == (False, False) and len(list(tmp_path.glob("*.npz"))) == 3
