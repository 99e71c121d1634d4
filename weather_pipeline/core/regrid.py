"""Regridding from a model grid to a region's regular lat/lon grid.

The target grid for bbox W,S,E,N and resolution r is `lon = W + k*r` (k = 0.. while <= E) and
`lat = N - k*r` (while >= S), computed from the integer index, row 0 northernmost.

For every target point we find its fractional index (i, j) in the source array (as eccodes
returns it, shape (Ny, Nx) in the file's scanning order): for Lambert conformal grids through
pyproj (the projection is never written by hand here), for regular lat/lon grids directly,
wrapping around 0 degrees longitude on global grids. Bilinear interpolation uses the four
neighbours; nearest uses the closest. A target point whose index lies on a source grid point
(within a tiny tolerance) takes that point's value exactly, with either method. Points outside
the source grid, and points whose neighbours are masked (NaN), are NaN.

Indices and weights depend only on (source grid, target grid, method), so they are computed
once and cached on disk under a key hashing all three.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyproj

from weather_pipeline.core.cache import atomic_write_bytes

log = logging.getLogger(__name__)

METHODS = ("bilinear", "nearest")
#: fractional indices this close to an integer are snapped to it (1e-6 of a cell)
SNAP = 1e-6
WEIGHTS_VERSION = 2
#: targets larger than this are regridded in parallel chunks (NumPy releases the GIL in take
#: and in the arithmetic, so threads use both cores of a small machine)
PARALLEL_MIN_POINTS = 200_000
_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="regrid")


class RegridError(ValueError):
    """A grid or region the regridder cannot handle; the message names it."""


@dataclass(frozen=True)
class TargetGrid:
    west: float
    south: float
    east: float
    north: float
    res: float

    def __post_init__(self) -> None:
        if not (self.res > 0):
            raise RegridError(f"resolution must be positive, got {self.res}")
        if not (-180 <= self.west < 180 and -180 <= self.east <= 180 and self.west < self.east):
            raise RegridError(
                f"bbox longitudes must satisfy -180 <= W < E <= 180, got W={self.west} E={self.east}"
            )
        if not (-90 <= self.south < self.north <= 90):
            raise RegridError(f"bbox latitudes must satisfy -90 <= S < N <= 90, got S={self.south} N={self.north}")

    @classmethod
    def parse_bbox(cls, bbox: str, res: float) -> "TargetGrid":
        try:
            w, s, e, n = (float(x) for x in bbox.split(","))
        except ValueError:
            raise RegridError(f"bad bbox {bbox!r}: expected W,S,E,N in degrees, e.g. -100,35,-95,40") from None
        return cls(w, s, e, n, float(res))

    @property
    def nx(self) -> int:
        return int(math.floor((self.east - self.west) / self.res + 1e-9)) + 1

    @property
    def ny(self) -> int:
        return int(math.floor((self.north - self.south) / self.res + 1e-9)) + 1

    @property
    def lons(self) -> np.ndarray:
        return self.west + np.arange(self.nx, dtype=np.float64) * self.res

    @property
    def lats(self) -> np.ndarray:
        return self.north - np.arange(self.ny, dtype=np.float64) * self.res

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    def key(self) -> dict[str, float]:
        return {"west": self.west, "south": self.south, "east": self.east, "north": self.north, "res": self.res}


@dataclass(frozen=True)
class SourceGrid:
    """The defining keys of a source grid, in eccodes terms (from the GRIB message itself)."""

    keys: Mapping[str, Any]

    # The keys that define where each point is; anything else does not change the weights.
    LAMBERT_KEYS = (
        "gridType", "Nx", "Ny", "latitudeOfFirstGridPointInDegrees", "longitudeOfFirstGridPointInDegrees",
        "LaDInDegrees", "LoVInDegrees", "Latin1InDegrees", "Latin2InDegrees", "DxInMetres", "DyInMetres",
        "scanningMode", "radius",
    )
    LATLON_KEYS = (
        "gridType", "Nx", "Ny", "latitudeOfFirstGridPointInDegrees", "longitudeOfFirstGridPointInDegrees",
        "latitudeOfLastGridPointInDegrees", "longitudeOfLastGridPointInDegrees",
        "iDirectionIncrementInDegrees", "jDirectionIncrementInDegrees", "scanningMode",
    )

    @property
    def kind(self) -> str:
        kind = self.keys.get("gridType")
        if kind not in ("lambert", "regular_ll"):
            raise RegridError(f"unsupported grid type {kind!r} (supported: lambert, regular_ll)")
        return kind

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.keys["Ny"]), int(self.keys["Nx"]))

    def defining(self) -> dict[str, Any]:
        names = self.LAMBERT_KEYS if self.kind == "lambert" else self.LATLON_KEYS
        missing = [k for k in names if k not in self.keys and k != "radius"]
        if missing:
            raise RegridError(f"{self.kind} grid lacks keys {missing}")
        return {k: self.keys.get(k) for k in names}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.defining(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- geometry ------------------------------------------------------------------------
    def lambert_proj(self) -> pyproj.Proj:
        k = self.keys
        radius = float(k.get("radius") or 6371229.0)
        lon_0 = ((float(k["LoVInDegrees"]) + 180) % 360) - 180
        return pyproj.Proj(
            f"+proj=lcc +lat_0={k['LaDInDegrees']} +lon_0={lon_0} +lat_1={k['Latin1InDegrees']} "
            f"+lat_2={k['Latin2InDegrees']} +R={radius} +units=m +no_defs"
        )

    def _scan(self) -> tuple[bool, bool]:
        """(i runs west to east, j runs south to north) from the scanning mode flags."""
        mode = int(self.keys.get("scanningMode", 0))
        if mode & 0b0010_0000:  # adjacent points in j direction are consecutive: not produced by NOAA
            raise RegridError(f"scanning mode {mode} (j-consecutive) is not supported")
        return (not mode & 0b1000_0000, bool(mode & 0b0100_0000))

    def fractional_index(self, lats: np.ndarray, lons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (i, j) = (column, row) in the source array of each (lat, lon) point."""
        k = self.keys
        ny, nx = self.shape
        i_east, j_north = self._scan()
        lat1 = float(k["latitudeOfFirstGridPointInDegrees"])
        lon1 = float(k["longitudeOfFirstGridPointInDegrees"])
        if self.kind == "lambert":
            proj = self.lambert_proj()
            x0, y0 = proj(lon1, lat1)
            x, y = proj(lons, lats)
            fi = (x - x0) / float(k["DxInMetres"])
            fj = (y - y0) / float(k["DyInMetres"])
            if not i_east:
                fi = -fi
            if not j_north:
                fj = -fj
        else:
            dlon = float(k["iDirectionIncrementInDegrees"])
            dlat = float(k["jDirectionIncrementInDegrees"])
            fi = np.mod(lons - lon1, 360.0) / dlon
            if not i_east:
                fi = np.mod(lon1 - lons, 360.0) / dlon
            fj = (lats - lat1) / dlat if j_north else (lat1 - lats) / dlat
            if self.is_global_in_longitude:
                # Points in the gap between the last column and 360 degrees wrap to column 0.
                fi = np.where(fi > nx - SNAP, fi - nx, fi)
        return fi, fj

    @property
    def is_global_in_longitude(self) -> bool:
        if self.kind != "regular_ll":
            return False
        return abs(int(self.keys["Nx"]) * float(self.keys["iDirectionIncrementInDegrees"]) - 360.0) < 1e-6


@dataclass(frozen=True)
class Weights:
    """Source indices and weights of the target points that lie inside the source grid.

    Stored compacted (valid points only, int32 indices) so that applying them is k gathers and
    multiply-adds over exactly the points that need them, with no masking per call.
    """

    index: np.ndarray  # (k, n_valid) int32 flat source indices; k = 4 bilinear, 1 nearest
    weight: np.ndarray  # (k, n_valid) float32
    valid: np.ndarray  # (ny * nx,) bool: which target points lie inside the source grid
    shape: tuple[int, int]

    def _accumulate(self, flat: np.ndarray, lo: int, hi: int, acc: np.ndarray) -> None:
        np.multiply(flat.take(self.index[0, lo:hi]), self.weight[0, lo:hi], out=acc[lo:hi])
        for r in range(1, self.index.shape[0]):
            acc[lo:hi] += flat.take(self.index[r, lo:hi]) * self.weight[r, lo:hi]

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Regrid a source field (Ny, Nx) to the target grid (float32, NaN outside)."""
        flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
        n = self.index.shape[1]
        acc = np.empty(n, dtype=np.float32)
        workers = _POOL._max_workers  # noqa: SLF001
        if n >= PARALLEL_MIN_POINTS and workers > 1:
            bounds = np.linspace(0, n, workers + 1).astype(int)
            list(_POOL.map(lambda b: self._accumulate(flat, b[0], b[1], acc), zip(bounds[:-1], bounds[1:])))
        else:
            self._accumulate(flat, 0, n, acc)
        if acc.size == self.valid.size:
            return acc.reshape(self.shape)
        out = np.full(self.valid.size, np.nan, dtype=np.float32)
        out[self.valid] = acc
        return out.reshape(self.shape)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, index=self.index, weight=self.weight, valid=self.valid, shape=np.array(self.shape))
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path, *, source_points: int | None = None,
                  shape: tuple[int, int] | None = None) -> "Weights":
        """Read weights back; ValueError when the file is damaged or does not fit the grids."""
        try:
            with np.load(path) as z:
                w = cls(z["index"], z["weight"], z["valid"], tuple(int(x) for x in z["shape"]))
        except (OSError, KeyError, EOFError, zipfile.BadZipFile, ValueError) as exc:
            raise ValueError(f"{path}: damaged weights file ({type(exc).__name__}: {exc})") from None
        ny, nx = w.shape
        n_valid = int(np.count_nonzero(w.valid))
        if (w.index.ndim != 2 or w.index.shape != w.weight.shape or w.valid.size != ny * nx
                or w.index.shape[1] != n_valid or w.index.dtype != np.int32
                or (shape is not None and w.shape != tuple(shape))
                or (w.index.size and (int(w.index.min()) < 0
                                      or (source_points is not None and int(w.index.max()) >= source_points)))):
            raise ValueError(f"{path}: weights do not fit the grids (damaged or stale)")
        return w


def _snap(f: np.ndarray) -> np.ndarray:
    r = np.rint(f)
    return np.where(np.abs(f - r) < SNAP, r, f)


def compute_weights(source: SourceGrid, target: TargetGrid, method: str = "bilinear") -> Weights:
    if method not in METHODS:
        raise RegridError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    ny, nx = source.shape
    lon2d, lat2d = np.meshgrid(target.lons, target.lats)
    fi, fj = source.fractional_index(lat2d.ravel(), lon2d.ravel())
    fi, fj = _snap(fi), _snap(fj)
    wrap = source.is_global_in_longitude
    i_hi = nx if wrap else nx - 1  # on a global grid the column after the last is column 0
    valid = (fi >= 0) & (fi <= i_hi) & (fj >= 0) & (fj <= ny - 1) & np.isfinite(fi) & np.isfinite(fj)
    fi, fj = np.where(valid, fi, 0.0), np.where(valid, fj, 0.0)
    if method == "nearest":
        # Round half away from zero, deterministic at exact midpoints.
        i0 = np.floor(fi + 0.5).astype(np.int64) % nx if wrap else np.floor(fi + 0.5).astype(np.int64)
        j0 = np.floor(fj + 0.5).astype(np.int64)
        index = (j0 * nx + i0)[None, :]
        weight = np.ones(index.shape, dtype=np.float32)
        return _compact(index, weight, valid, target.shape)
    i0 = np.floor(fi).astype(np.int64)
    j0 = np.floor(fj).astype(np.int64)
    di, dj = fi - i0, fj - j0
    # On an exact column/row the "next" neighbour is the point itself with weight 0, so a
    # masked neighbour cannot turn an exact value into NaN, and the last column stays in range.
    i1 = np.where(di > 0, i0 + 1, i0)
    j1 = np.where(dj > 0, j0 + 1, j0)
    if wrap:
        i0, i1 = i0 % nx, i1 % nx
    index = np.stack([j0 * nx + i0, j0 * nx + i1, j1 * nx + i0, j1 * nx + i1])
    weight = np.stack([(1 - di) * (1 - dj), di * (1 - dj), (1 - di) * dj, di * dj]).astype(np.float32)
    return _compact(index, weight, valid, target.shape)


def _compact(index: np.ndarray, weight: np.ndarray, valid: np.ndarray, shape: tuple[int, int]) -> Weights:
    return Weights(index[:, valid].astype(np.int32), np.ascontiguousarray(weight[:, valid]), valid, shape)


def weights_key(source: SourceGrid, target: TargetGrid, method: str) -> str:
    payload = json.dumps(
        {"v": WEIGHTS_VERSION, "grid": source.defining(), "target": target.key(), "method": method},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


#: weights recently used by this process, by file: a batch of hours reuses them (a CONUS
#: 0.05-degree set is ~20 MB and takes ~10 ms to read back from disk)
_MEMO: OrderedDict[str, Weights] = OrderedDict()
_MEMO_SIZE = 8
_MEMO_LOCK = threading.Lock()


def cached_weights(cache_dir: Path, source: SourceGrid, target: TargetGrid, method: str = "bilinear") -> tuple[Weights, bool]:
    """Weights from memory or `cache_dir` when present, else computed and stored. Returns (weights, hit)."""
    path = Path(cache_dir) / f"{source.kind}-{weights_key(source, target, method)}.npz"
    key = str(path.absolute())
    with _MEMO_LOCK:
        if key in _MEMO and path.is_file():
            _MEMO.move_to_end(key)
            return _MEMO[key], True
    weights, hit = None, False
    if path.is_file():
        try:
            weights, hit = Weights.from_file(path, source_points=source.shape[0] * source.shape[1],
                                             shape=target.shape), True
        except ValueError as exc:
            log.warning("rebuilding %s: %s", path, exc)
            path.unlink(missing_ok=True)  # a damaged file is rebuilt, never trusted
    if weights is None:
        weights = compute_weights(source, target, method)
        atomic_write_bytes(path, weights.to_bytes())
    with _MEMO_LOCK:
        _MEMO[key] = weights
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return weights, hit
