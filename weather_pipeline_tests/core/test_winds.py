"""Grid-relative to earth-relative winds on the real HRRR grid."""

import numpy as np
import pytest

from weather_pipeline.core import grib
from weather_pipeline.core.regrid import SourceGrid
from weather_pipeline.core.winds import grid_point_lonlat, rotate_to_earth, rotation_angle


@pytest.fixture(scope="module")
def hrrr_grid(real_dir):
    return SourceGrid(grib.read_field(real_dir / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2").grid_keys)


def test_angle_measured_by_pyproj_equals_the_lambert_cone_formula(hrrr_grid):
    alpha = rotation_angle(hrrr_grid)
    lon, _ = grid_point_lonlat(hrrr_grid)
    formula = np.sin(np.radians(38.5)) * np.radians(lon - -97.5)  # n (lon - LoV), n = sin(Latin1)
    assert alpha.shape == (1059, 1799)
    assert np.abs(alpha - formula).max() < 1e-6
    assert alpha[530, 0] < 0 < alpha[530, -1]  # west of LoV negative, east positive


def test_grid_point_coordinates_match_eccodes(hrrr_grid, real_dir):
    import eccodes

    with open(real_dir / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2", "rb") as fh:
        h = eccodes.codes_grib_new_from_file(fh)
    lats = eccodes.codes_get_array(h, "latitudes").reshape(1059, 1799)
    lons = eccodes.codes_get_array(h, "longitudes").reshape(1059, 1799)
    eccodes.codes_release(h)
    lon, lat = grid_point_lonlat(hrrr_grid)
    assert np.abs(lat - lats).max() < 1e-6 and np.abs(np.mod(lon, 360) - lons).max() < 1e-6


def test_constructed_case_wind_toward_grid_north():
    # 10 m/s toward grid north where alpha = 10 degrees: earth-relative it blows toward
    # north-north-east, u = 10 sin(10 deg), v = 10 cos(10 deg); speed is preserved.
    alpha = np.radians(np.array([[10.0, 0.0, -30.0]]))
    u, v = rotate_to_earth(np.zeros((1, 3), np.float32), np.full((1, 3), 10.0, np.float32), alpha)
    np.testing.assert_allclose(u[0], [10 * np.sin(np.radians(10)), 0.0, 10 * np.sin(np.radians(-30))], atol=1e-5)
    np.testing.assert_allclose(v[0], [10 * np.cos(np.radians(10)), 10.0, 10 * np.cos(np.radians(-30))], atol=1e-5)
    np.testing.assert_allclose(np.hypot(u, v), 10.0, atol=1e-5)


def test_true_north_vector_round_trips_through_the_projection(hrrr_grid):
    """A due-north earth wind, expressed in grid axes with pyproj, rotates back to due north."""
    proj = hrrr_grid.lambert_proj()
    lon, lat = -80.0, 40.0  # well east of LoV
    x1, y1 = proj(lon, lat)
    x2, y2 = proj(lon, lat + 0.01)
    gx, gy = (x2 - x1), (y2 - y1)
    norm = np.hypot(gx, gy)
    u_grid, v_grid = np.float32(5 * gx / norm), np.float32(5 * gy / norm)
    alpha = np.sin(np.radians(38.5)) * np.radians(lon + 97.5)
    u, v = rotate_to_earth(np.array([u_grid]), np.array([v_grid]), np.array([alpha]))
    assert abs(u[0]) < 1e-3 and abs(v[0] - 5) < 1e-3
