"""Python access for weather users: open tiles as xarray, list the cache, fetch an hour yourself.

    import weather_pipeline.api as wp

    # an hourly tile: dims (lat, lon), scalar coords time (valid), reference_time, step
    ds = wp.open_tile("cache", "conus", 0.25, "hrrr", "20260512_00", "t2m", hour=3)
    ds["t2m"].sel(lat=39.0, lon=-97.0, method="nearest")

    # a run tile: every hour of the run stacked on the time dimension (valid times)
    run = wp.open_run_tile("cache", "conus", 0.25, "hrrr", "20260512_00", "t2m")
    run["t2m"].sel(time="2026-05-12T06:00")

    wp.list_cache("cache")                 # what the cache holds (GRIB subsets, tiles, run tiles)
    wp.inventory("hrrr", "20260512_00", 3, search=":TMP:2 m above ground:")   # the .idx entries
    wp.fetch_hour("hrrr", "20260512_00", 3, cache="cache")   # the ingest the assets run, in-process

`fetch_hour` and `inventory` use the same code as the Dagster assets (sources best first, rate
limits, retries, circuit breakers, the header identity check, atomic commits); the sources are
the real NOAA ones unless you name others (`sources="mirror", mirror_url=...`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from weather_pipeline.core.cache import CacheLayout, sidecar_path
from weather_pipeline.core.catalog import Catalog, load_catalog, parse_run_key

__all__ = ["CacheEntry", "fetch_hour", "inventory", "list_cache", "open_run_tile", "open_tile"]


def _layout(cache: str | Path | CacheLayout) -> CacheLayout:
    return cache if isinstance(cache, CacheLayout) else CacheLayout(Path(cache))


def _sidecar(npz: Path) -> dict:
    try:
        return json.loads(sidecar_path(npz).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{npz} has no sidecar {sidecar_path(npz)}: not a tile of this cache") from None


def _attrs(meta: dict) -> dict:
    """Sidecar fields as netCDF-friendly attributes (scalars and strings only)."""
    out = {}
    for key, value in meta.items():
        if key in ("stats", "hours", "shape"):
            continue
        if isinstance(value, (list, dict)):
            value = json.dumps(value, sort_keys=True)
        out[key] = "" if value is None else value
    for key, value in (meta.get("stats") or {}).items():
        out[f"stats_{key}"] = np.nan if value is None else value
    return out


def _open(path: Path, variable: str | None = None):
    import xarray as xr

    meta = _sidecar(path)
    name = variable or meta.get("variable") or "data"
    with np.load(path) as z:
        data, lat, lon = z["data"], z["lat"], z["lon"]
        hours = z["hours"] if "hours" in z.files else None
    reference = np.datetime64(parse_run_key(meta["run"]).replace(tzinfo=None), "ns")
    var_attrs = {"units": meta.get("units", ""), "long_name": meta.get("long_name", name)}
    coords = {"lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
              "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
              "reference_time": reference}
    if hours is None:
        hour = int(meta["hour"])
        coords |= {"time": reference + np.timedelta64(hour, "h"), "step": np.timedelta64(hour, "h")}
        ds = xr.Dataset({name: (("lat", "lon"), data, var_attrs)}, coords=coords)
    else:
        steps = np.asarray(hours, dtype="timedelta64[h]").astype("timedelta64[ns]")
        coords |= {"time": ("time", reference + steps, {"long_name": "valid time"}), "step": ("time", steps)}
        ds = xr.Dataset({name: (("time", "lat", "lon"), data, var_attrs)}, coords=coords)
    ds.attrs = _attrs(meta) | {"source_file": str(path)}
    return ds


def open_tile(cache: str | Path | CacheLayout, region: str, res: float, model: str, run: str, variable: str,
              hour: int):
    """One hourly tile as an `xarray.Dataset` (dims lat, lon; NaN outside the model's grid)."""
    path = _layout(cache).tile_path(region, res, model, run, variable, hour)
    if not path.is_file():
        raise FileNotFoundError(f"no tile {path} (is hour {hour} of {model} {run} built for {region} at {res:g} deg?)")
    return _open(path, variable)


def open_run_tile(cache: str | Path | CacheLayout, region: str, res: float, model: str, run: str, variable: str):
    """A run tile (every hour of the run that exists) as an `xarray.Dataset` with dims time, lat, lon."""
    path = _layout(cache).run_tile_path(region, res, model, run, variable)
    if not path.is_file():
        raise FileNotFoundError(f"no run tile {path} (no hour of {model} {run} built for {region} at {res:g} deg?)")
    return _open(path, variable)


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "grib", "tile" or "run_tile"
    model: str
    run: str
    variable: str
    hour: int | None  # None for a run tile
    region: str | None
    res: float | None
    path: str
    bytes: int


def list_cache(cache: str | Path | CacheLayout, model: str | None = None) -> list[CacheEntry]:
    """What the cache holds, GRIB subsets first, in path order (`pandas.DataFrame(list_cache(...))`)."""
    layout = _layout(cache)
    out: list[CacheEntry] = []
    for path in sorted(layout.gribs_root.glob(f"{model or '*'}/*/*/grib_[0-9][0-9][0-9].grib2")):
        var_dir = path.parent
        out.append(CacheEntry("grib", var_dir.parent.parent.name, var_dir.parent.name, var_dir.name,
                              int(path.stem[5:]), None, None, str(path), path.stat().st_size))
    for path in sorted(layout.tiles_root.glob(f"*/*deg/{model or '*'}/*/*.npz")):
        if not sidecar_path(path).is_file():
            continue
        meta = _sidecar(path)
        out.append(CacheEntry("run_tile", meta["model"], meta["run"], meta["variable"], None, meta["region"],
                              float(meta["res"]), str(path), path.stat().st_size))
    for path in sorted(layout.tiles_root.glob(f"*/*deg/{model or '*'}/*/*/tile_[0-9][0-9][0-9].npz")):
        if not sidecar_path(path).is_file():
            continue
        meta = _sidecar(path)
        out.append(CacheEntry("tile", meta["model"], meta["run"], meta["variable"], int(meta["hour"]), meta["region"],
                              float(meta["res"]), str(path), path.stat().st_size))
    return out


def _client_and_settings(sources: str, mirror_url: str | None, catalog: Catalog):
    from weather_pipeline.core.http import HttpClient, HttpConfig
    from weather_pipeline.core.sources import SourceSettings, rate_limits, redirect_hosts

    settings = SourceSettings.parse(sources, mirror_url, catalog=catalog)
    config = HttpConfig(rate_limits=rate_limits(settings, catalog), redirect_hosts=redirect_hosts(settings, catalog))
    return HttpClient(config), settings


def inventory(model: str, run: str, hour: int, *, sources: str = "aws,nomads", mirror_url: str | None = None,
              search: str | None = None):
    """The `.idx` entries of one forecast hour from the first source that has it (`IdxEntry` list)."""
    from weather_pipeline.core.http import NotFound
    from weather_pipeline.core.idx import parse_idx
    from weather_pipeline.core.idx import search as idx_search
    from weather_pipeline.core.ingest import HourNotPublished, MAX_IDX_BYTES
    from weather_pipeline.core.sources import candidate_sources

    catalog = load_catalog()
    m = catalog.model(model)
    m.validate_hour(run, hour)
    client, settings = _client_and_settings(sources, mirror_url, catalog)
    tried = []
    with client:
        for choice in candidate_sources(m, parse_run_key(run), settings, catalog=catalog):
            url = choice.url(m, parse_run_key(run), hour) + ".idx"
            try:
                entries = parse_idx(client.get_text(url, max_bytes=MAX_IDX_BYTES), source=url)
            except NotFound:
                tried.append(url)
                continue
            return idx_search(entries, search) if search else entries
    raise HourNotPublished(f"{model} run {run} hour {hour}: no .idx at {', '.join(tried)}")


def fetch_hour(model: str, run: str, hour: int, *, cache: str | Path | CacheLayout = "cache",
               sources: str = "aws,nomads", mirror_url: str | None = None,
               variables: Sequence[str] | None = None):
    """Fetch one forecast hour's GRIB subsets into the cache, exactly as the IngestGrib asset does.

    Returns the `IngestReport` (files, md5s, bytes, requests). Raises what the ingest raises
    (HourNotPublished, SourceUnreachable, MessageMismatch, CacheWriteError, ...).
    """
    from weather_pipeline.core.ingest import ingest_hour

    catalog = load_catalog()
    client, settings = _client_and_settings(sources, mirror_url, catalog)
    with client:
        return ingest_hour(model, run, hour, cache=_layout(cache), client=client, settings=settings,
                           variables=variables, catalog=catalog)

