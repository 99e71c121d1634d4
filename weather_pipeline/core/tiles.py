"""BuildTile: the GRIB subsets of one forecast hour -> regional NPZ tiles with JSON sidecars.

Per forecast hour and variable the GRIB is decoded once, winds marked grid-relative are rotated
to earth-relative with their partner component, and the field is regridded to every (region,
resolution) of the model with cached weights. Each hourly tile is written atomically, then its
sidecar. A tile whose sidecar already records the same source md5 and method is not rebuilt.

Run tiles (all hours of a run that exist, stacked) are rewritten from the hourly tiles, one
plane at a time straight into the zip member, so memory stays at about one plane whatever the
number of hours.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import eccodes
import numpy as np

from weather_pipeline.core import grib
from weather_pipeline.core.cache import (
    CacheLayout,
    atomic_write_text,
    atomic_writer,
    file_lock,
    format_res,
    hour_lock,
    md5_bytes,
    md5_file,
    sidecar_path,
    sweep_dead_temps,
)
from weather_pipeline.core.catalog import Catalog, Model, Region, Variable, load_catalog
from weather_pipeline.core.regrid import SourceGrid, TargetGrid, Weights, cached_weights
from weather_pipeline.core.winds import cached_rotation_angle, rotate_to_earth


class TileError(ValueError):
    """A tile that cannot be built; the message names the model, run, hour and variable."""


class GribNeedsRefetch(TileError):
    """The GRIB subset of an hour is not the one the ingest verified (changed on disk, or decodes
    to impossible values): it was moved to quarantine, and the hour must be ingested again."""

    def __init__(self, message: str, variable: str, path: Path, quarantined: Path | None):
        super().__init__(message)
        self.variable = variable
        self.path = path
        self.quarantined = quarantined


def quarantine(cache: CacheLayout, path: Path) -> Path | None:
    """Move a damaged cache file to `cache/quarantine/...` (same relative path); None if gone."""
    dest = cache.quarantine_path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    return dest


@dataclass(frozen=True)
class TileTarget:
    region: str
    res: float
    grid: TargetGrid
    max_nan_fraction: float

    @property
    def label(self) -> str:
        return f"{self.region}/{format_res(self.res)}deg"


def targets_for(model_name: str, catalog: Catalog | None = None, regions: Sequence[str] | None = None) -> list[TileTarget]:
    catalog = catalog or load_catalog()
    chosen: Iterable[Region] = (
        [catalog.region(r) for r in regions] if regions else catalog.regions_for(model_name)
    )
    return [
        TileTarget(r.name, res, TargetGrid(*r.bbox, res), r.max_nan_fraction)
        for r in chosen
        for res in r.resolutions
    ]


def field_stats(data: np.ndarray) -> dict[str, float | None]:
    finite = np.isfinite(data)
    n = int(finite.sum())
    if n == 0:
        return {"min": None, "max": None, "mean": None, "nan_fraction": 1.0}
    values = data[finite]
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean(dtype=np.float64)),
        "nan_fraction": float(1.0 - n / data.size),
    }


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_sidecar(npz_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar_path(npz_path).read_text())
    except (OSError, ValueError):
        return None


def write_tile(path: Path, data: np.ndarray, target: TargetGrid, sidecar: dict[str, Any]) -> None:
    """The hourly tile (data, lat, lon) and then its sidecar, each atomically.

    The sidecar records the tile's size (`npz_bytes`), so a tile deleted, truncated or replaced
    by hand is not mistaken for an up-to-date one.
    """
    with atomic_writer(path) as fh:
        np.savez(fh, data=data.astype(np.float32, copy=False), lat=target.lats, lon=target.lons)
        size = fh.tell()
    atomic_write_text(sidecar_path(path), json.dumps({**sidecar, "npz_bytes": size}, indent=1, sort_keys=True))


# -- one forecast hour --------------------------------------------------------------------


@dataclass
class TileResult:
    region: str
    res: float
    variable: str
    path: str
    source_grib_md5: str
    stats: dict[str, float | None]
    built: bool  # False: unchanged source, not rebuilt


@dataclass
class HourTiles:
    model: str
    run: str
    hour: int
    method: str
    results: list[TileResult] = field(default_factory=list)
    decode_s: float = 0.0
    regrid_s: float = 0.0
    write_s: float = 0.0

    @property
    def built(self) -> list[TileResult]:
        return [r for r in self.results if r.built]

    @property
    def unchanged(self) -> list[TileResult]:
        return [r for r in self.results if not r.built]


def tile_intact(path: Path, meta: dict[str, Any] | None) -> bool:
    """The tile exists beside a readable sidecar and has the size the sidecar recorded (cheap)."""
    if not meta:
        return False
    try:
        size = path.stat().st_size
    except OSError:
        return False
    recorded = meta.get("npz_bytes")
    return recorded is None or recorded == size


def _up_to_date(path: Path, md5: str, method: str) -> dict[str, Any] | None:
    meta = read_sidecar(path)
    if tile_intact(path, meta) and meta.get("source_grib_md5") == md5 and meta.get("method") == method:
        return meta
    return None


def _decode(cache: CacheLayout, model: Model, run: str, hour: int, var: Variable, data: bytes, path: Path) -> grib.Field:
    """The one value decode of a cached GRIB; one that cannot be decoded is quarantined."""
    try:
        return grib.read_field(data, describe_field=False)
    except (grib.GribError, IndexError, eccodes.CodesInternalError) as exc:
        moved = quarantine(cache, path)
        raise GribNeedsRefetch(
            f"{model.name} {run} f{hour:03d} {var.name}: cannot decode {path} ({type(exc).__name__}: {exc}); "
            f"moved to {moved}, the hour must be ingested again", var.name, path, moved) from None


def build_hour(
    model_name: str,
    run: str,
    hour: int,
    cache: CacheLayout,
    *,
    method: str = "bilinear",
    variables: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    force: bool = False,
    catalog: Catalog | None = None,
    expected_md5: dict[str, str] | None = None,
) -> HourTiles:
    """Build (or confirm up to date) every tile of one forecast hour from its GRIB subsets.

    Holds the hour's tile lock throughout, so two builds of one hour never interleave (the
    second then finds the tiles up to date). `expected_md5` (variable -> md5, what the ingest recorded) is checked before a GRIB is used:
    a GRIB that changed on disk since it was verified is quarantined and GribNeedsRefetch
    raised. So is one whose decoded values fall outside the variable's plausible envelope
    (`Variable.plausible_range`; ingest does not decode values, so this is the only decode): the tile is never built from it.
    """
    catalog = catalog or load_catalog()
    model = catalog.model(model_name)
    model.validate_hour(run, hour)
    with hour_lock(cache, "tiles", model.name, run, hour):
        return _build_hour(model, run, hour, cache, method, variables, regions, force, catalog, expected_md5)


def _build_hour(model: Model, run: str, hour: int, cache: CacheLayout, method: str, variables, regions,
                force: bool, catalog: Catalog, expected_md5: dict[str, str] | None) -> HourTiles:
    wanted = [v for v in model.select_variables(list(variables) if variables else None) if v.present_at(hour)]
    targets = targets_for(model.name, catalog, regions)
    tile_paths = [cache.tile_path(t.region, t.res, model.name, run, v.name, hour) for v in wanted for t in targets]
    sweep_dead_temps(tile_paths + [sidecar_path(p) for p in tile_paths])
    report = HourTiles(model.name, run, hour, method)
    gribs = cache.grib_paths_for_hour(model.name, run, hour)

    # Which variables need work: a missing GRIB is fine only when its tiles are already built.
    todo: dict[str, tuple[str, bytes]] = {}  # variable -> (md5, bytes) of its GRIB
    for var in wanted:
        path = gribs.get(var.name)
        tiles = [cache.tile_path(t.region, t.res, model.name, run, var.name, hour) for t in targets]
        if path is None:
            metas = [read_sidecar(p) for p in tiles]
            if all(tile_intact(p, m) for m, p in zip(metas, tiles)):
                for t, p, m in zip(targets, tiles, metas):
                    report.results.append(TileResult(t.region, t.res, var.name, str(p), m["source_grib_md5"], m["stats"], False))
                continue
            raise TileError(
                f"{model.name} {run} f{hour:03d} {var.name}: no GRIB subset in the cache "
                f"({cache.grib_path(model.name, run, var.name, hour)}); ingest it first"
            )
        data = path.read_bytes()  # read once: hashed here, decoded below if needed
        md5 = md5_bytes(data)
        recorded = (expected_md5 or {}).get(var.name)
        if expected_md5 is not None and recorded != md5:
            moved = quarantine(cache, path)
            raise GribNeedsRefetch(
                f"{model.name} {run} f{hour:03d} {var.name}: {path} is not the GRIB the ingest verified "
                f"(md5 {md5}, recorded {recorded or 'none'}); moved to {moved}, the hour must be ingested again",
                var.name, path, moved)
        current = [_up_to_date(p, md5, method) for p in tiles]
        if not force and all(current):
            for t, p, m in zip(targets, tiles, current):
                report.results.append(TileResult(t.region, t.res, var.name, str(p), md5, m["stats"], False))
            continue
        todo[var.name] = (md5, data)
    # A rotated wind component needs its partner, so both are rebuilt together.
    for name in list(todo):
        pair = model.variables[name].pair
        if pair and pair not in todo and pair in gribs and model.variables[pair] in wanted:
            data = gribs[pair].read_bytes()
            todo[pair] = (md5_bytes(data), data)
            report.results = [r for r in report.results if r.variable != pair]

    fields: dict[str, np.ndarray] = {}
    grids: dict[str, SourceGrid] = {}
    t0 = time.perf_counter()
    for name, (_md5, data) in todo.items():
        f = _decode(cache, model, run, hour, model.variables[name], data, gribs[name])
        _check_plausible(cache, model, run, hour, model.variables[name], f.values, gribs[name])
        fields[name], grids[name] = f.values, SourceGrid(f.grid_keys)
    for name in todo:
        var = model.variables[name]
        if var.wind == "u" and var.pair in fields and int(grids[name].keys.get("uvRelativeToGrid") or 0):
            alpha = cached_rotation_angle(cache.weights_dir, grids[name])
            fields[name], fields[var.pair] = rotate_to_earth(fields[name], fields[var.pair], alpha)
    report.decode_s = time.perf_counter() - t0

    generated_at = utc_now_iso()
    for name, (md5, _data) in todo.items():
        var = model.variables[name]
        rotated = bool(var.wind and int(grids[name].keys.get("uvRelativeToGrid") or 0) and var.pair in fields)
        for t in targets:
            t1 = time.perf_counter()
            weights, _ = cached_weights(cache.weights_dir, grids[name], t.grid, method)
            data = weights.apply(fields[name])
            t2 = time.perf_counter()
            stats = field_stats(data)
            path = cache.tile_path(t.region, t.res, model.name, run, name, hour)
            write_tile(path, data, t.grid, _sidecar(model, var, run, hour, t, method, md5, stats, generated_at, grids[name], rotated))
            report.regrid_s += t2 - t1
            report.write_s += time.perf_counter() - t2
            report.results.append(TileResult(t.region, t.res, name, str(path), md5, stats, True))
    return report


def _check_plausible(cache: CacheLayout, model: Model, run: str, hour: int, var: Variable, values: np.ndarray,
                     path: Path) -> None:
    """Quarantine a GRIB whose decoded values cannot be real (corruption eccodes did not notice)."""
    why = None
    if values.ndim != 2:
        why = f"decodes to {values.size} values that do not fill its grid"
    else:
        with warnings.catch_warnings():  # an all-missing field is NaN throughout: nothing to check
            warnings.simplefilter("ignore", RuntimeWarning)
            vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))  # missing points are NaN
        if not (np.isfinite(vmin) and np.isfinite(vmax)):
            why = "decodes to infinite values" if np.isinf([vmin, vmax]).any() else None
        elif var.plausible_range and (vmin < var.plausible_range[0] or vmax > var.plausible_range[1]):
            why = (f"decodes to values in [{vmin:g}, {vmax:g}], outside the plausible "
                   f"[{var.plausible_range[0]:g}, {var.plausible_range[1]:g}]")
    if why:
        moved = quarantine(cache, path)
        raise GribNeedsRefetch(
            f"{model.name} {run} f{hour:03d} {var.name}: {path} {why}: corrupt; moved to {moved}, the hour must be "
            "ingested again",
            var.name, path, moved)


def _sidecar(model: Model, var: Variable, run: str, hour: int, t: TileTarget, method: str, md5: str,
             stats: dict, generated_at: str, grid: SourceGrid, rotated: bool) -> dict[str, Any]:
    return {
        "model": model.name,
        "run": run,
        "hour": hour,
        "variable": var.name,
        "long_name": var.long_name,
        "units": var.units,
        "region": t.region,
        "res": t.res,
        "bbox": [t.grid.west, t.grid.south, t.grid.east, t.grid.north],
        "shape": list(t.grid.shape),
        "method": method,
        "source_grib_md5": md5,
        "source_grid": grid.fingerprint(),
        "winds": ("earth-relative (rotated from grid-relative)" if rotated else "as published") if var.wind else None,
        "generated_at": generated_at,
        "stats": stats,
    }


# -- run tiles ----------------------------------------------------------------------------


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, planes: Iterable[np.ndarray]) -> None:
    with zf.open(name, "w", force_zip64=True) as member:
        np.lib.format.write_array_header_2_0(
            member, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        )
        for plane in planes:
            member.write(np.ascontiguousarray(plane, dtype=dtype).tobytes())


def update_run_tile(cache: CacheLayout, region: str, res: float, model_name: str, run: str, variable: str,
                    *, force: bool = False) -> Path | None:
    """Bring `{variable}.npz` up to date with the hourly tiles present; None when there are none.

    The run tile is current when its sidecar lists the same hours with the same source md5s as
    the hourly sidecars; otherwise it is rewritten. Runs of different hours of one model run
    update the same run tile: its lock makes the later one read the hourly tiles after the
    earlier one wrote, so the run tile never goes back to fewer hours.
    """
    path = cache.run_tile_path(region, res, model_name, run, variable)
    with file_lock(cache, path):
        sweep_dead_temps([path, sidecar_path(path)])
        return _update_run_tile(cache, region, res, model_name, run, variable, force)


def _update_run_tile(cache: CacheLayout, region: str, res: float, model_name: str, run: str, variable: str,
                     force: bool) -> Path | None:
    hourly = cache.hourly_tiles(region, res, model_name, run, variable)
    if not hourly:
        return None
    hours = sorted(hourly)
    metas = {h: read_sidecar(hourly[h]) or {} for h in hours}
    path = cache.run_tile_path(region, res, model_name, run, variable)
    current = read_sidecar(path)
    wanted_md5 = {str(h): metas[h].get("source_grib_md5") for h in hours}
    if not force and current and path.is_file() and current.get("source_grib_md5") == wanted_md5:
        return path
    with np.load(hourly[hours[0]]) as first:
        lat, lon = first["lat"], first["lon"]
        ny, nx = first["data"].shape
    running = {"min": np.inf, "max": -np.inf, "sum": 0.0, "n": 0}

    def planes() -> Iterable[np.ndarray]:
        for h in hours:
            with np.load(hourly[h]) as z:
                plane = z["data"]
            if plane.shape != (ny, nx):
                raise TileError(f"{hourly[h]} has shape {plane.shape}, the run tile {(ny, nx)}")
            finite = plane[np.isfinite(plane)]
            if finite.size:
                running["min"] = min(running["min"], float(finite.min()))
                running["max"] = max(running["max"], float(finite.max()))
                running["sum"] += float(finite.sum(dtype=np.float64))
                running["n"] += int(finite.size)
            yield plane

    with atomic_writer(path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_member(zf, "data.npy", (len(hours), ny, nx), np.float32, planes())
        for name, arr in (("lat", lat), ("lon", lon), ("hours", np.asarray(hours, dtype=np.int32))):
            with zf.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, arr)
    total = len(hours) * ny * nx
    any_meta = next(iter(metas.values()))
    sidecar = {
        **{k: any_meta.get(k) for k in ("model", "run", "variable", "long_name", "units", "region", "res", "bbox", "method", "winds")},
        "hours": hours,
        "shape": [len(hours), ny, nx],
        "source_grib_md5": wanted_md5,
        "generated_at": utc_now_iso(),
        "stats": {
            "min": running["min"] if running["n"] else None,
            "max": running["max"] if running["n"] else None,
            "mean": running["sum"] / running["n"] if running["n"] else None,
            "nan_fraction": 1.0 - running["n"] / total,
        },
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=1, sort_keys=True))
    return path


# -- one file, for the CLI ------------------------------------------------------------------


def tile_from_file(grib_path: Path, target: TargetGrid, out: Path, *, method: str = "bilinear",
                   search: str | None = None, cache_dir: Path | None = None,
                   allow_empty: bool = False) -> dict[str, Any]:
    """A tile (and sidecar) from the first message of a local GRIB2 file matching `search`.

    A box entirely outside the GRIB's grid gives only NaN: TileError (nothing written) unless
    `allow_empty`.
    """
    data = Path(grib_path).read_bytes()
    index = 0
    if search:
        from weather_pipeline.core.idx import parse_idx, search as idx_search

        entries = parse_idx(grib.build_index(data), source=str(grib_path))
        hits = idx_search(entries, search)
        if not hits:
            raise TileError(f"{grib_path}: no message matches {search!r}")
        index = entries.index(hits[0])
    # md5 while eccodes decodes: both release the GIL, so the hash costs no wall time
    with ThreadPoolExecutor(max_workers=1) as hasher:
        md5 = hasher.submit(md5_bytes, data)
        try:
            f = grib.read_field(data, index, metadata_keys=("units",))
        except (grib.GribError, IndexError, eccodes.CodesInternalError) as exc:
            raise TileError(f"cannot decode {grib_path}: {exc}") from None
    source = SourceGrid(f.grid_keys)
    if cache_dir is None:
        from weather_pipeline.core.regrid import compute_weights

        weights: Weights = compute_weights(source, target, method)
    else:
        weights, _ = cached_weights(cache_dir, source, target, method)
    tile = weights.apply(f.values)
    stats = field_stats(tile)
    if stats["nan_fraction"] == 1.0 and not allow_empty:
        raise TileError(f"the box {target.west:g},{target.south:g},{target.east:g},{target.north:g} lies outside "
                        f"the grid of {grib_path}: the tile would be all NaN; nothing written (--allow-empty to "
                        "write it anyway)")
    sidecar = {
        "source_file": str(grib_path),
        "source_grib_md5": md5.result(),
        "message": str(f.inventory) if f.inventory else None,
        "units": f.metadata.get("units"),
        "region": "custom",
        "res": target.res,
        "bbox": [target.west, target.south, target.east, target.north],
        "shape": list(target.shape),
        "method": method,
        "source_grid": source.fingerprint(),
        "winds": "as published (a single message cannot be rotated)"
        if int(f.grid_keys.get("uvRelativeToGrid") or 0) else None,
        "generated_at": utc_now_iso(),
        "stats": stats,
    }
    write_tile(out, tile, target, sidecar)
    return sidecar


# -- GRIB retention -------------------------------------------------------------------------


def retire_gribs(cache: CacheLayout, report: HourTiles) -> int:
    """Delete an hour's GRIB subsets whose tiles all exist and were made from those very bytes.

    Returns the bytes freed. Called only when the model's `keep_gribs` is off; a GRIB whose
    tiles are missing or disagree on the md5 is kept, so nothing is lost before it is tiled.
    """
    freed = 0
    by_var: dict[str, list[TileResult]] = {}
    for r in report.results:
        by_var.setdefault(r.variable, []).append(r)
    gribs = cache.grib_paths_for_hour(report.model, report.run, report.hour)
    for var, results in by_var.items():
        path = gribs.get(var)
        if path is None:
            continue
        md5 = md5_file(path)
        if all(Path(r.path).is_file() and (read_sidecar(Path(r.path)) or {}).get("source_grib_md5") == md5 for r in results):
            freed += path.stat().st_size
            path.unlink()
    return freed
