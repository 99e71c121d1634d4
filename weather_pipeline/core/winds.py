"""Grid-relative winds (HRRR, `uvRelativeToGrid=1`) to earth-relative, before regridding.

On a Lambert conformal grid, grid north and true north differ by the meridian convergence
angle alpha at each point; for a tangent cone (Latin1 = Latin2) it is
    alpha = n * (lon - LoV),  n = sin(Latin1)
(NCEP's `rotcon` formula), positive east of LoV, where meridians lean toward the cone's apex.
Earth-relative components are the grid components rotated by alpha:
    u_earth =  cos(alpha) * u_grid + sin(alpha) * v_grid
    v_earth = -sin(alpha) * u_grid + cos(alpha) * v_grid

We do not hard-code the cone formula: alpha is measured with pyproj itself, by projecting each
grid point and a point a little to its north and taking the direction of true north in grid
coordinates. The result works for any projection pyproj knows; the tests check it against the
formula above and on a constructed case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weather_pipeline.core.cache import atomic_write_bytes
from weather_pipeline.core.regrid import SourceGrid

#: degrees of latitude for the finite difference (about 11 m: far below the 3 km grid)
_DLAT = 1e-4


def grid_point_lonlat(source: SourceGrid) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (degrees) of every point of a Lambert grid, shaped (Ny, Nx)."""
    k = source.keys
    ny, nx = source.shape
    proj = source.lambert_proj()
    x0, y0 = proj(float(k["longitudeOfFirstGridPointInDegrees"]), float(k["latitudeOfFirstGridPointInDegrees"]))
    i_east, j_north = source._scan()  # noqa: SLF001 - the scanning flags belong to the grid
    xs = x0 + (1 if i_east else -1) * np.arange(nx) * float(k["DxInMetres"])
    ys = y0 + (1 if j_north else -1) * np.arange(ny) * float(k["DyInMetres"])
    x2d, y2d = np.meshgrid(xs, ys)
    lon, lat = proj(x2d, y2d, inverse=True)
    return lon, lat


def rotation_angle(source: SourceGrid) -> np.ndarray:
    """alpha (radians), the angle from grid north to true north, at every grid point (Ny, Nx)."""
    if source.kind != "lambert":
        return np.zeros(source.shape, dtype=np.float32)
    proj = source.lambert_proj()
    lon, lat = grid_point_lonlat(source)
    x1, y1 = proj(lon, lat)
    x2, y2 = proj(lon, lat + _DLAT)
    # Direction of true north in grid axes, measured clockwise from grid +y; alpha is minus that.
    theta = np.arctan2(x2 - x1, y2 - y1)
    return (-theta).astype(np.float32)


def cached_rotation_angle(cache_dir: Path, source: SourceGrid) -> np.ndarray:
    path = Path(cache_dir) / f"rotation-{source.fingerprint()}.npy"
    if path.is_file():
        try:
            angle = np.load(path)
            if angle.shape == tuple(source.shape) and angle.dtype == np.float32 and np.isfinite(angle).all():
                return angle
        except (OSError, ValueError, EOFError):
            pass
        path.unlink(missing_ok=True)  # damaged or stale: rebuilt, never trusted
    angle = rotation_angle(source)
    import io

    buf = io.BytesIO()
    np.save(buf, angle)
    atomic_write_bytes(path, buf.getvalue())
    return angle


def rotate_to_earth(u: np.ndarray, v: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid-relative (u, v) to earth-relative, by the angle alpha (radians) at each point."""
    c, s = np.cos(alpha), np.sin(alpha)
    return (c * u + s * v).astype(np.float32), (-s * u + c * v).astype(np.float32)
