"""Synthetic NOAA-identical mirror: real-format GRIB2 files and `.idx` inventories.

`generate_run` writes, for each forecast hour of a run, the file NOAA would publish and its
`.idx` under `root/<bucket>/<relative path>`: the bucket is the last path component of the
model's `urls.mirror` template (`{mirror}/noaa-hrrr-bdp-pds`) and the relative path comes from
the catalog, so serving `root` over HTTP makes the catalog's mirror URLs resolve.

Contents.  Each hour holds the message list of a real NOAA file of that model in the real
order (the inventory templates below transcribe the 2023-11-04 HRRR wrfsfc f00/f05 and GFS
pgrb2.0p25 f000/f021 inventories; `weather_pipeline_tests` checks them against those files),
with forecast times moved to the hour.  Every message is real GRIB2 on the catalog grid with
complex packing and second-order spatial differencing, and names itself (via `grib.describe`)
exactly as the real inventory line does.  The catalog variables with a recipe below (the
defaults t2m, u10, v10, apcp, refc, mslp, plus gust) get smooth, plausible, deterministic
fields; every other message carries one shared filler field per hour (sea-ice fields a
bitmapped one, zero-length statistics a constant zero), which keeps generation to a few
seconds per hour while the default variables sit among realistic neighbours at realistic
offsets.

Accumulations and other statistics follow NOAA's conventions: "run total" messages cover
0-N hours; "bucket" messages cover the hours since the last multiple of the model's bucket
length (HRRR: the last hour; GFS: buckets reset every 6 hours, so GFS f001-f006 and HRRR f01
carry two identical APCP lines, as NOAA's files do).  The analysis hour writes statistics as
zero-length ranges (`0-0 day acc fcst`).

Values are quantized to powers of two before packing so the packing is exact: decoded run
totals never decrease from hour to hour and buckets are exactly their differences.  Output is
deterministic in (seed, model, run, hour, variable); files are written atomically (temporary
file, then `os.replace`), the `.idx` after its GRIB file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

import eccodes

from weather_pipeline.core import grib
from weather_pipeline.core.catalog import CatalogError, Model, load_catalog

# ------------------------------------------------------------------------------------------
# Inventory templates
# ------------------------------------------------------------------------------------------
# One line per group of messages: "VAR[,VAR...] @ LEVEL[; LEVEL...] [: KIND]", expanded level
# by level, variable by variable.  KIND is empty for a point in time, "acc"/"ave"/"max"/"min"
# for a statistic over the current bucket and "acc0" etc. for one since the run started.
# A leading "- " marks messages absent from the analysis (hour 0) file.

HRRR_INVENTORY = """
REFC @ entire atmosphere
RETOP @ cloud top
var discipline=0 center=7 local_table=1 parmcat=16 parm=201,VIL @ entire atmosphere
VIS @ surface
REFD @ 1000 m above ground; 4000 m above ground; 263 K level
GUST @ surface
UGRD,VGRD @ 250 mb; 300 mb
HGT,TMP,DPT,UGRD,VGRD @ 500 mb
HGT,TMP,DPT,DZDT,UGRD,VGRD @ 700 mb
HGT,TMP,DPT,UGRD,VGRD @ 850 mb
TMP,DPT,UGRD,VGRD @ 925 mb; 1000 mb
MAXUVV,MAXDVV @ 100-1000 mb above ground : max
DZDT @ 0.5-0.8 sigma layer : ave
MSLMA @ mean sea level
HGT @ 1000 mb
MAXREF @ 1000 m above ground : max
REFD @ 263 K level : max
MXUPHL @ 5000-2000 m above ground : max
MNUPHL @ 5000-2000 m above ground : min
MXUPHL @ 2000-0 m above ground : max
MNUPHL @ 2000-0 m above ground : min
MXUPHL @ 3000-0 m above ground : max
MNUPHL @ 3000-0 m above ground : min
RELV @ 2000-0 m above ground; 1000-0 m above ground : max
HAIL @ entire atmosphere; 0.1 sigma level; surface : max
TCOLG @ entire atmosphere (considered as a single layer) : max
LTNGSD @ 1 m above ground; 2 m above ground
LTNG @ entire atmosphere
UGRD,VGRD @ 80 m above ground
PRES,HGT,TMP @ surface
ASNOW @ surface : acc0
MSTAV @ 0 m underground
CNWAT,WEASD,SNOWC,SNOD @ surface
TMP,POT,SPFH,DPT,RH @ 2 m above ground
MASSDEN @ 8 m above ground
UGRD,VGRD @ 10 m above ground
WIND,MAXUW,MAXVW @ 10 m above ground : max
CPOFP,PRATE @ surface
APCP,WEASD,FROZR,FRZR @ surface : acc0
SSRUN,BGRUN @ surface : acc
- APCP,WEASD,FROZR @ surface : acc
CSNOW,CICEP,CFRZR,CRAIN,SFCR,FRICV,SHTFL,LHTFL,VEG @ surface
var discipline=2 center=7 local_table=1 parmcat=0 parm=231 @ surface
var discipline=2 center=7 local_table=1 parmcat=0 parm=232 @ surface
LAI,GFLUX,VGTYP @ surface
LFTX @ 500-1000 mb
CAPE,CIN @ surface
PWAT,AOTK,COLMD @ entire atmosphere (considered as a single layer)
TCOLW,TCOLI @ entire atmosphere
TCDC @ boundary layer cloud layer
LCDC @ low cloud layer
MCDC @ middle cloud layer
HCDC @ high cloud layer
TCDC @ entire atmosphere
HGT @ cloud ceiling
HGT,PRES @ cloud base
PRES,HGT @ cloud top
ULWRF @ top of atmosphere
DSWRF,DLWRF,USWRF,ULWRF,CFNSF,VBDSF,VDDSF @ surface
USWRF @ top of atmosphere
HLCY @ 3000-0 m above ground; 1000-0 m above ground
USTM,VSTM @ 0-6000 m above ground
VUCSH,VVCSH @ 0-1000 m above ground; 0-6000 m above ground
HGT,RH,PRES @ 0C isotherm; highest tropospheric freezing level
HGT @ 263 K level; 253 K level
4LFTX,CAPE,CIN @ 180-0 mb above ground
HPBL @ surface
HGT @ level of adiabatic condensation from sfc
CAPE,CIN @ 90-0 mb above ground; 255-0 mb above ground
HGT @ equilibrium level
PLPL @ 255-0 mb above ground
CAPE @ 0-3000 m above ground
HGT @ level of free convection
var discipline=0 center=7 local_table=1 parmcat=7 parm=204 @ surface
var discipline=0 center=7 local_table=1 parmcat=7 parm=206 @ 0-500 m above ground
LAYTH @ 261 K level - 256 K level
var discipline=0 center=7 local_table=1 parmcat=7 parm=205 @ 0-3000 m above ground
RHPW @ entire atmosphere
LAND,ICEC @ surface
SBT123,SBT124,SBT113,SBT114 @ top of atmosphere
"""

_GFS_ISOBARIC = "HGT,TMP,RH,TCDC,SPFH,VVEL,DZDT,UGRD,VGRD,ABSV,CLWMR,ICMR,RWMR,SNMR,GRLE,O3MR"
_GFS_UPPER = "HGT,TMP,RH,SPFH,VVEL,DZDT,UGRD,VGRD,ABSV,O3MR"

GFS_INVENTORY = f"""
PRMSL @ mean sea level
CLWMR,ICMR,RWMR,SNMR,GRLE,REFD @ 1 hybrid level
REFD @ 2 hybrid level
REFC @ entire atmosphere
VIS @ surface
UGRD,VGRD,VRATE @ planetary boundary layer
GUST @ surface
{_GFS_UPPER} @ 0.01 mb; 0.02 mb; 0.04 mb; 0.07 mb; 0.1 mb; 0.2 mb; 0.4 mb; 0.7 mb; 1 mb; 2 mb; \
3 mb; 5 mb; 7 mb; 10 mb; 15 mb; 20 mb; 30 mb; 40 mb
{_GFS_ISOBARIC} @ 50 mb
{_GFS_UPPER} @ 70 mb
{_GFS_ISOBARIC} @ 100 mb; 150 mb; 200 mb; 250 mb; 300 mb; 350 mb; 400 mb; 450 mb; 500 mb; \
550 mb; 600 mb; 650 mb; 700 mb; 750 mb; 800 mb; 850 mb; 900 mb; 925 mb; 950 mb
HINDEX @ surface
{_GFS_ISOBARIC} @ 975 mb
{_GFS_ISOBARIC.removeprefix("HGT,")} @ 1000 mb
MSLET @ mean sea level
HGT @ 1000 mb
REFD @ 4000 m above ground; 1000 m above ground
PRES,HGT,TMP @ surface
TSOIL,SOILW,SOILL @ 0-0.1 m below ground; 0.1-0.4 m below ground; 0.4-1 m below ground; \
1-2 m below ground
CNWAT,WEASD,SNOD @ surface
- PEVPR @ surface
ICETK @ surface
TMP,SPFH,DPT,RH,APTMP @ 2 m above ground
- TMAX @ 2 m above ground : max
- TMIN @ 2 m above ground : min
UGRD,VGRD @ 10 m above ground
ICEG @ 10 m above mean sea level
CPOFP @ surface
- CPRAT @ surface
PRATE @ surface
- CPRAT,PRATE @ surface : ave
- APCP @ surface : acc
- APCP @ surface : acc0
- ACPCP @ surface : acc
- ACPCP @ surface : acc0
- WATR @ surface : acc
CSNOW,CICEP,CFRZR,CRAIN @ surface
- CSNOW,CICEP,CFRZR,CRAIN,LHTFL,SHTFL,GFLUX,UFLX,VFLX @ surface : ave
SFCR,FRICV @ surface
- U-GWD,V-GWD @ surface : ave
VEG,SOTYP,WILT,FLDCP,SUNSD,LFTX,CAPE,CIN @ surface
PWAT,CWAT,RH,TOZNE @ entire atmosphere (considered as a single layer)
LCDC @ low cloud layer
- LCDC @ low cloud layer : ave
MCDC @ middle cloud layer
- MCDC @ middle cloud layer : ave
HCDC @ high cloud layer
- HCDC @ high cloud layer : ave
TCDC @ entire atmosphere
- TCDC @ entire atmosphere : ave
HGT @ cloud ceiling
- PRES @ convective cloud bottom level
- PRES @ low cloud bottom level; middle cloud bottom level; high cloud bottom level : ave
- PRES @ convective cloud top level
- PRES @ low cloud top level; middle cloud top level; high cloud top level : ave
- TMP @ low cloud top level; middle cloud top level; high cloud top level : ave
- TCDC @ convective cloud layer
- TCDC @ boundary layer cloud layer : ave
- CWORK @ entire atmosphere (considered as a single layer) : ave
- DSWRF,DLWRF,USWRF,ULWRF @ surface : ave
- USWRF,ULWRF @ top of atmosphere : ave
HLCY @ 3000-0 m above ground
USTM,VSTM @ 6000-0 m above ground
PRES,ICAHT,HGT,TMP,UGRD,VGRD,VWSH @ tropopause
PRES,ICAHT,HGT,UGRD,VGRD,TMP @ max wind
UGRD,VGRD @ 20 m above ground; 30 m above ground; 40 m above ground; 50 m above ground
TMP,SPFH,PRES,UGRD,VGRD @ 80 m above ground
TMP,UGRD,VGRD @ 100 m above ground; 1829 m above mean sea level; 2743 m above mean sea level; \
3658 m above mean sea level
HGT,RH @ 0C isotherm; highest tropospheric freezing level
TMP,RH,SPFH,UGRD,VGRD @ 30-0 mb above ground
4LFTX @ surface
CAPE,CIN @ 180-0 mb above ground
HPBL @ surface
RH @ 0.33-1 sigma layer; 0.44-1 sigma layer; 0.72-0.94 sigma layer; 0.44-0.72 sigma layer
TMP,POT,RH,UGRD,VGRD,VVEL @ 0.995 sigma level
CAPE,CIN @ 90-0 mb above ground
CAPE,CIN,PLPL @ 255-0 mb above ground
LAND,ICEC @ surface
- ALBDO @ surface : ave
ICETMP @ surface
UGRD,VGRD,TMP,HGT,PRES,VWSH @ PV=2e-06 (Km^2/kg/s) surface; PV=-2e-06 (Km^2/kg/s) surface
"""


@dataclass(frozen=True)
class InventoryTemplate:
    """A model's message list and how long its statistical "buckets" run (hours)."""

    spec: str
    bucket_hours: int


#: Message lists of the NOAA products the mirror imitates, by catalog model name.
INVENTORY_TEMPLATES: dict[str, InventoryTemplate] = {
    "hrrr": InventoryTemplate(HRRR_INVENTORY, bucket_hours=1),
    "gfs": InventoryTemplate(GFS_INVENTORY, bucket_hours=6),
}

_PROCESS_CODES = {"ave": 0, "acc": 1, "max": 2, "min": 3}


@dataclass(frozen=True)
class InventoryEntry:
    """One message of a template: wgrib2 variable and level, and its kind of time range."""

    variable: str
    level: str
    statistic: str | None = None  # "acc", "ave", "max" or "min"; None at a point in time
    run_total: bool = False  # statistic since the run started rather than over the bucket
    at_analysis: bool = True  # present in the analysis (hour 0) file


@dataclass(frozen=True)
class PlannedMessage:
    """An inventory entry placed at a forecast hour: its time range in hours."""

    entry: InventoryEntry
    start: int  # start of the statistical range; the hour itself for a point in time
    end: int  # the forecast hour

    @property
    def statistics(self) -> grib.StatisticalRange | None:
        if self.entry.statistic is None:
            return None
        return grib.StatisticalRange(
            process=_PROCESS_CODES[self.entry.statistic],
            increment_type=2,  # successive forecast times of one run
            unit=1,
            length=self.end - self.start,
        )

    @property
    def forecast(self) -> str:
        return grib.format_forecast(1, self.start, self.statistics)

    @property
    def inventory(self) -> str:
        """`VAR:LEVEL:FORECAST` as wgrib2 will print it for this message."""
        return f"{self.entry.variable}:{self.entry.level}:{self.forecast}"


def parse_inventory(spec: str) -> tuple[InventoryEntry, ...]:
    """Expand an inventory template (format above) into its entries, in file order."""
    entries: list[InventoryEntry] = []
    for raw in spec.strip().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        at_analysis = not line.startswith("- ")
        body, _, kind = line.removeprefix("- ").partition(" : ")
        variables, sep, levels = body.partition(" @ ")
        if not sep:
            raise ValueError(f"inventory line without ' @ ': {raw!r}")
        kind = kind.strip()
        statistic = kind.rstrip("0") or None
        if statistic is not None and statistic not in _PROCESS_CODES:
            raise ValueError(f"unknown statistic {kind!r} in inventory line {raw!r}")
        for level in levels.split(";"):
            for variable in variables.split(","):
                entries.append(
                    InventoryEntry(
                        variable.strip(), level.strip(), statistic, kind.endswith("0"), at_analysis
                    )
                )
    return tuple(entries)


@lru_cache(maxsize=8)
def _template_entries(model_name: str) -> tuple[InventoryTemplate, tuple[InventoryEntry, ...]]:
    try:
        template = INVENTORY_TEMPLATES[model_name]
    except KeyError:
        raise CatalogError(
            f"the mirror has no inventory template for model {model_name!r}; it can generate "
            f"{', '.join(sorted(INVENTORY_TEMPLATES))}"
        ) from None
    return template, parse_inventory(template.spec)


def plan_hour(model_name: str, hour: int) -> list[PlannedMessage]:
    """The messages of one forecast hour's file, in file order."""
    template, entries = _template_entries(model_name)
    bucket_start = ((hour - 1) // template.bucket_hours) * template.bucket_hours if hour else 0
    planned = []
    for entry in entries:
        if hour == 0 and not entry.at_analysis:
            continue
        if entry.statistic is None:
            start = hour
        else:
            start = 0 if entry.run_total else bucket_start
        planned.append(PlannedMessage(entry, start, hour))
    return planned


# ------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------


def _bucket(model: Model) -> str:
    template = model.urls.get("mirror")
    if not template:
        raise CatalogError(f"model {model.name} has no mirror URL in the catalog")
    return template.rstrip("/").rsplit("/", 1)[-1]


def mirror_relative_path(model_name: str, run: str, hour: int) -> str:
    """`<bucket>/<relative path>` of a file below the mirror root, e.g.
    `noaa-hrrr-bdp-pds/hrrr.20231104/conus/hrrr.t01z.wrfsfcf05.grib2`."""
    model = load_catalog().model(model_name)
    return f"{_bucket(model)}/{model.relative_path(run, hour)}"


# ------------------------------------------------------------------------------------------
# Deterministic fields
# ------------------------------------------------------------------------------------------


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from the parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class _Geometry:
    """Grid point coordinates in file order, plus normalized axes for cheap smooth fields."""

    lat: np.ndarray  # (ny, nx) float32 degrees
    lon: np.ndarray  # (ny, nx) float32 degrees east
    x: np.ndarray  # (nx,) in [0, 1]
    y: np.ndarray  # (ny,) in [0, 1]
    periodic: bool  # x wraps around the globe

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.shape  # type: ignore[return-value]


@dataclass
class _Context:
    """What the field recipes of one run see; caches are per run (patterns) and per hour."""

    model: str
    run_time: datetime
    seed: int
    geometry: _Geometry
    run_cache: dict[Any, Any] = field(default_factory=dict)
    hour_cache: dict[Any, Any] = field(default_factory=dict)

    def rng(self, *parts: object) -> np.random.Generator:
        return _rng(self.seed, self.model, f"{self.run_time:%Y%m%d%H}", *parts)

    def smooth(
        self, name: str, hour: int, *, modes: int = 10, waves: float = 4.0, drift: float = 0.05
    ) -> np.ndarray:
        """A smooth field with zero mean and unit standard deviation drifting with the hour.

        A sum of separable sine modes: each costs one outer product, so a full HRRR field
        takes milliseconds.  Modes depend on the run, not the hour, so fields evolve smoothly.
        """
        key = ("smooth", name, hour)
        if key in self.hour_cache:
            return self.hour_cache[key]
        rng = self.rng("smooth", name)
        g = self.geometry
        out = np.zeros(g.shape, dtype=np.float32)
        for _ in range(modes):
            kx = int(rng.integers(1, int(waves) + 1)) if g.periodic else rng.uniform(0.5, waves)
            ky = rng.uniform(0.5, waves)
            phase_x, phase_y = rng.uniform(0.0, 2 * np.pi, 2)
            speed = rng.uniform(-drift, drift) * 2 * np.pi
            weight = rng.uniform(0.3, 1.0) / (kx + ky)
            along_x = np.sin(2 * np.pi * kx * g.x + phase_x + speed * hour).astype(np.float32)
            along_y = np.sin(np.pi * ky * g.y + phase_y).astype(np.float32)
            out += np.float32(weight) * np.multiply.outer(along_y, along_x)
        out -= out.mean()
        out /= out.std() or 1.0
        self.hour_cache[key] = out
        return out

    def texture(self, name: str, hour: int, sigma: float) -> np.ndarray:
        """Small-scale noise, so packed sizes and value statistics look like model output."""
        rng = self.rng("texture", name, hour)
        return rng.standard_normal(self.geometry.shape, dtype=np.float32) * np.float32(sigma)


@dataclass(frozen=True)
class _Recipe:
    make: Callable[[_Context, PlannedMessage], np.ndarray]
    step: float  # quantum, a power of two, so complex packing represents values exactly


def _t2m(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    g = ctx.geometry
    lat = np.deg2rad(g.lat)
    base = 253.0 + 45.0 * np.cos(lat) ** 2  # warm tropics, cold poles
    utc_hour = (ctx.run_time.hour + pm.end) % 24
    solar_hour = (utc_hour + g.lon / 15.0) % 24.0
    diurnal = 5.0 * np.cos(2 * np.pi * (solar_hour - 15.0) / 24.0)  # warmest mid-afternoon
    synoptic = 6.0 * ctx.smooth("t2m", pm.end, modes=12, waves=5.0, drift=0.08)
    return base + diurnal + synoptic + ctx.texture("t2m", pm.end, 0.15)


def _u10(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    return 2.0 + 6.0 * ctx.smooth("u10", pm.end, drift=0.08) + ctx.texture("u10", pm.end, 0.3)


def _v10(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    return 6.0 * ctx.smooth("v10", pm.end, drift=0.08) + ctx.texture("v10", pm.end, 0.3)


def _gust(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    u, v = _cached(ctx, "u10", pm), _cached(ctx, "v10", pm)
    return 1.0 + 1.35 * np.hypot(u, v) + np.abs(ctx.texture("gust", pm.end, 0.5))


def _mslp(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    synoptic = 1600.0 * ctx.smooth("mslp", pm.end, modes=8, waves=3.0, drift=0.06)
    mesoscale = 300.0 * ctx.smooth("mslp-meso", pm.end, modes=10, waves=9.0, drift=0.1)
    return 101325.0 + synoptic + mesoscale + ctx.texture("mslp", pm.end, 1.0)


@dataclass(frozen=True)
class _RainEpisode:
    start: float  # hour the rain starts (negative: already raining when the run starts)
    duration: float  # hours it lasts
    pattern: int  # which rain pattern it leaves
    shift: int  # columns the pattern is moved by, so recurring patterns fall elsewhere


_PRECIP_STEP = 2.0**-6
_RAIN_PATTERNS = 8
_RAIN_EVERY_HOURS = 6.0


def _rain_patterns(ctx: _Context) -> list[np.ndarray]:
    """Rain totals (kg m-2) of one episode each: ~8% of the domain wet, in bands and cells."""
    key = "rain-patterns"
    if key not in ctx.run_cache:
        rng = ctx.rng("rain-amounts")
        patterns = []
        for number in range(_RAIN_PATTERNS):
            smooth = ctx.smooth(f"rain-{number}", 0, modes=12, waves=6.0, drift=0.0)
            amount = np.float32(rng.uniform(8.0, 20.0))
            patterns.append(np.clip(smooth - 1.4, 0.0, None) * amount)
        ctx.run_cache[key] = patterns
    return ctx.run_cache[key]


def _episodes(ctx: _Context, last_hour: int) -> list[_RainEpisode]:
    """Rain episodes every few hours through `last_hour`, the first under way at hour 0."""
    rng = ctx.rng("rain-episodes")
    episodes = []
    for number in range(int(last_hour // _RAIN_EVERY_HOURS) + 2):
        start = -4.0 + _RAIN_EVERY_HOURS * number + rng.uniform(0.0, 4.0)
        duration = rng.uniform(4.0, 12.0)
        shift = int(rng.integers(0, ctx.geometry.shape[1]))
        episodes.append(_RainEpisode(start, duration, number % _RAIN_PATTERNS, shift))
    return episodes


def _precip_total(ctx: _Context, hour: int) -> np.ndarray:
    """Rain since the run started, quantized: zero at hour 0, non-decreasing in `hour`."""
    key = ("rain-total", hour)
    if key not in ctx.hour_cache:
        patterns = _rain_patterns(ctx)
        total = np.zeros(ctx.geometry.shape, dtype=np.float64)
        for episode in _episodes(ctx, hour):

            def fallen(at: float, e: _RainEpisode = episode) -> float:
                return min(max((at - e.start) / e.duration, 0.0), 1.0)

            fraction = fallen(hour) - fallen(0.0)  # only what falls after the run started
            if fraction > 0:
                total += np.roll(patterns[episode.pattern], episode.shift, axis=1) * fraction
        ctx.hour_cache[key] = _quantize(total, _PRECIP_STEP)
    return ctx.hour_cache[key]


def _apcp(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    # A bucket is the difference of two quantized totals: exact and never negative.
    return _precip_total(ctx, pm.end) - _precip_total(ctx, pm.start)


#: Composite reflectivity where nothing echoes, as each model writes it (dBZ).
_NO_ECHO_DBZ = {"hrrr": -10.0}
_DEFAULT_NO_ECHO_DBZ = -20.0


def _refc(ctx: _Context, pm: PlannedMessage) -> np.ndarray:
    hour = max(pm.end, 1)
    rate = _precip_total(ctx, hour) - _precip_total(ctx, hour - 1)  # kg m-2 in the last hour
    no_echo = _NO_ECHO_DBZ.get(ctx.model, _DEFAULT_NO_ECHO_DBZ)
    # Marshall-Palmer Z = 200 R^1.6, so echoes sit where it rains.
    dbz = 23.0 + 16.0 * np.log10(np.maximum(rate, 1e-3)) + ctx.texture("refc", pm.end, 1.5)
    return np.where(rate > 0.05, np.clip(dbz, no_echo, 75.0), no_echo)


#: Field recipes by catalog variable name; other messages carry the filler field.
FIELD_RECIPES: dict[str, _Recipe] = {
    "t2m": _Recipe(_t2m, 2.0**-5),
    "u10": _Recipe(_u10, 2.0**-6),
    "v10": _Recipe(_v10, 2.0**-6),
    "gust": _Recipe(_gust, 2.0**-5),
    "apcp": _Recipe(_apcp, _PRECIP_STEP),
    "refc": _Recipe(_refc, 2.0**-3),
    "mslp": _Recipe(_mslp, 2.0**-1),
}


def _quantize(values: np.ndarray, step: float) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64) / step) * step


def _cached(ctx: _Context, name: str, pm: PlannedMessage) -> np.ndarray:
    key = ("field", name, pm.start, pm.end)
    if key not in ctx.hour_cache:
        recipe = FIELD_RECIPES[name]
        ctx.hour_cache[key] = _quantize(recipe.make(ctx, pm), recipe.step)
    return ctx.hour_cache[key]


_FILLER_STEP = 2.0**-1


def _filler(ctx: _Context, hour: int) -> np.ndarray:
    """The field all other messages of an hour share: smooth, in [0, 60], in steps of 0.5,
    which packs to ~1.6 bits per point (HRRR ~390 kB, GFS ~220 kB a message)."""
    values = 30.0 + 9.0 * ctx.smooth("filler", hour)
    return _quantize(np.clip(values, 0.0, 60.0), _FILLER_STEP)


def _is_sea_ice(entry: InventoryEntry) -> bool:
    # ICEC, ICETK, ICETMP, ICEG: defined over ice only, so they carry a bitmap.
    return entry.variable.startswith("ICE")


# ------------------------------------------------------------------------------------------
# GRIB2 encoding
# ------------------------------------------------------------------------------------------

_NCEP_CENTRE = 7
_MISSING = 9999.0


def _grid_settings(grid: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """eccodes keys (in order) that put the catalog grid into sections 3 and 5."""
    kind = grid.get("type")
    relative = 8 if grid.get("winds_grid_relative") else 0  # flag bit 5: u/v along the grid
    nx, ny = int(grid["nx"]), int(grid["ny"])
    if kind == "lambert_conformal":
        keys: list[tuple[str, Any]] = [
            ("gridDefinitionTemplateNumber", 30),
            ("Nx", nx),
            ("Ny", ny),
            ("latitudeOfFirstGridPointInDegrees", float(grid["first_lat"])),
            ("longitudeOfFirstGridPointInDegrees", float(grid["first_lon"])),
            ("LaDInDegrees", float(grid["lad"])),
            ("LoVInDegrees", float(grid["lov"])),
            ("Latin1InDegrees", float(grid["latin1"])),
            ("Latin2InDegrees", float(grid["latin2"])),
            ("DxInMetres", float(grid["dx_m"])),
            ("DyInMetres", float(grid["dy_m"])),
            ("projectionCentreFlag", 0),
            # NCEP writes no southern pole for its Lambert grids (zeros, not -90)
            ("latitudeOfSouthernPole", 0),
            ("longitudeOfSouthernPole", 0),
            ("resolutionAndComponentFlags", relative),
        ]
    elif kind == "regular_ll":
        keys = [
            ("gridDefinitionTemplateNumber", 0),
            ("Ni", nx),
            ("Nj", ny),
            ("latitudeOfFirstGridPointInDegrees", float(grid["first_lat"])),
            ("longitudeOfFirstGridPointInDegrees", float(grid["first_lon"])),
            ("latitudeOfLastGridPointInDegrees", float(grid["last_lat"])),
            ("longitudeOfLastGridPointInDegrees", float(grid["last_lon"])),
            ("iDirectionIncrementInDegrees", float(grid["dlon"])),
            ("jDirectionIncrementInDegrees", float(grid["dlat"])),
            ("resolutionAndComponentFlags", 0x30 | relative),  # increments given
        ]
    else:
        raise CatalogError(f"the mirror cannot write grids of type {kind!r}")
    radius = float(grid.get("earth_radius_m", 6371229.0))
    if radius == 6371229.0:
        earth = [("shapeOfTheEarth", 6), ("scaleFactorOfRadiusOfSphericalEarth", 0),
                 ("scaledValueOfRadiusOfSphericalEarth", 0)]
    else:
        earth = [("shapeOfTheEarth", 1), ("scaleFactorOfRadiusOfSphericalEarth", 0),
                 ("scaledValueOfRadiusOfSphericalEarth", int(round(radius)))]
    earth += [("scaleFactorOfEarthMajorAxis", 0), ("scaledValueOfEarthMajorAxis", 0),
              ("scaleFactorOfEarthMinorAxis", 0), ("scaledValueOfEarthMinorAxis", 0)]
    return (
        [("packingType", "grid_complex_spatial_differencing")]
        + keys[:1]
        + earth
        + keys[1:]
        + [
            ("scanningMode", int(grid.get("scanning_mode", 0))),
            ("numberOfDataPoints", nx * ny),
            ("orderOfSpatialDifferencing", 2),  # as NCEP packs
        ]
    )


def _new_grid_handle(grid: Mapping[str, Any]) -> Any:
    handle = eccodes.codes_grib_new_from_samples("GRIB2")
    try:
        for key, value in _section1_settings(None):
            eccodes.codes_set(handle, key, value)
        for key, value in _grid_settings(grid):
            eccodes.codes_set(handle, key, value)
    except BaseException:
        eccodes.codes_release(handle)
        raise
    return handle


def _section1_settings(run_time: datetime | None) -> list[tuple[str, Any]]:
    keys: list[tuple[str, Any]] = [
        ("centre", _NCEP_CENTRE),
        ("subCentre", 0),
        ("tablesVersion", 2),
        ("localTablesVersion", 1),
        ("significanceOfReferenceTime", 1),  # start of forecast
        ("productionStatusOfProcessedData", 0),
        ("typeOfProcessedData", 1),  # forecast products, as NCEP marks even analyses
    ]
    if run_time is not None:
        keys += [
            ("dataDate", int(run_time.strftime("%Y%m%d"))),
            ("dataTime", run_time.hour * 100),
        ]
    return keys


def _section(message: bytes, number: int) -> bytes:
    for sec in grib.grib2_sections(message):
        if sec.number == number:
            return message[sec.offset : sec.end]
    raise grib.GribError(f"eccodes wrote no section {number}")


def _grid_key(grid: Mapping[str, Any]) -> str:
    return json.dumps(dict(grid), sort_keys=True, default=str)


@lru_cache(maxsize=4)
def _geometry(grid_key: str) -> _Geometry:
    """Coordinates of every grid point, as eccodes computes them from section 3 (cached)."""
    grid = json.loads(grid_key)
    handle = _new_grid_handle(grid)
    try:
        nx, ny = int(grid["nx"]), int(grid["ny"])
        eccodes.codes_set(handle, "bitsPerValue", 0)
        eccodes.codes_set_values(handle, np.zeros(nx * ny))
        lat = eccodes.codes_get_array(handle, "latitudes").astype(np.float32).reshape(ny, nx)
        lon = eccodes.codes_get_array(handle, "longitudes").astype(np.float32).reshape(ny, nx)
    finally:
        eccodes.codes_release(handle)
    periodic = grid.get("type") == "regular_ll" and abs(nx * float(grid["dlon"]) - 360.0) < 1e-6
    x = np.arange(nx, dtype=np.float64) / (nx if periodic else max(nx - 1, 1))
    y = np.arange(ny, dtype=np.float64) / max(ny - 1, 1)
    return _Geometry(lat=lat, lon=lon, x=x, y=y, periodic=periodic)


class _Encoder:
    """eccodes handles for one run: sections 1 and 3 once, section 4 per message, 5-7 per field."""

    def __init__(self, model: Model, run_time: datetime) -> None:
        self.run_time = run_time
        self._grid = _new_grid_handle(model.grid)
        self._product = eccodes.codes_grib_new_from_samples("GRIB2")
        for key, value in _section1_settings(run_time):
            eccodes.codes_set(self._product, key, value)
        self.section1 = _section(eccodes.codes_get_message(self._product), 1)
        grid_message = eccodes.codes_get_message(self._grid)
        self.section3 = _section(grid_message, 3)

    def close(self) -> None:
        eccodes.codes_release(self._grid)
        eccodes.codes_release(self._product)

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def data_sections(
        self, values: np.ndarray, step: float, missing: np.ndarray | None = None
    ) -> bytes:
        """Sections 5-7 for quantized `values` (file order), bitmapped where `missing`."""
        flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
        handle = eccodes.codes_clone(self._grid)
        try:
            if missing is not None:
                mask = missing.ravel()
                eccodes.codes_set(handle, "bitmapPresent", 1)
                eccodes.codes_set(handle, "missingValue", _MISSING)
                present = flat[~mask]
                flat = np.where(mask, _MISSING, flat)
            else:
                present = flat
            span = round(float(present.max() - present.min()) / step) if present.size else 0
            # Enough bits for the quantum: eccodes then picks a binary scale <= log2(step),
            # so the quantized values are packed without loss.
            eccodes.codes_set(handle, "bitsPerValue", int(span).bit_length())
            eccodes.codes_set_values(handle, flat)
            message = eccodes.codes_get_message(handle)
        finally:
            eccodes.codes_release(handle)
        sections = grib.grib2_sections(message)
        first = next(sec for sec in sections if sec.number == 5)
        return message[first.offset : len(message) - 4]

    def product_section(self, pm: PlannedMessage, parameter: tuple[int, int, int]) -> bytes:
        """Section 4: template 4.0 at a point in time, 4.8 for statistics."""
        handle = eccodes.codes_clone(self._product)
        try:
            statistics = pm.statistics
            settings: list[tuple[str, Any]] = [
                ("productDefinitionTemplateNumber", 0 if statistics is None else 8),
                ("discipline", parameter[0]),
                ("parameterCategory", parameter[1]),
                ("parameterNumber", parameter[2]),
                ("typeOfGeneratingProcess", 2),  # forecast
                ("backgroundProcess", 0),
                ("hoursAfterDataCutoff", 0),
                ("minutesAfterDataCutoff", 0),
                ("indicatorOfUnitOfTimeRange", 1),
                ("forecastTime", pm.start),
            ]
            settings += grib.encode_level(pm.entry.level).eccodes_keys().items()
            if statistics is not None:
                end = self.run_time + timedelta(hours=pm.end)
                settings += [
                    ("yearOfEndOfOverallTimeInterval", end.year),
                    ("monthOfEndOfOverallTimeInterval", end.month),
                    ("dayOfEndOfOverallTimeInterval", end.day),
                    ("hourOfEndOfOverallTimeInterval", end.hour),
                    ("minuteOfEndOfOverallTimeInterval", 0),
                    ("secondOfEndOfOverallTimeInterval", 0),
                    ("numberOfTimeRange", 1),
                    ("numberOfMissingInStatisticalProcess", 0),
                    ("typeOfStatisticalProcessing", statistics.process),
                    ("typeOfTimeIncrement", statistics.increment_type),
                    ("indicatorOfUnitForTimeRange", statistics.unit),
                    ("lengthOfTimeRange", statistics.length),
                    ("indicatorOfUnitForTimeIncrement", 255),
                    ("timeIncrement", 0),
                ]
            for key, value in settings:
                eccodes.codes_set(handle, key, value)
            return _section(eccodes.codes_get_message(handle), 4)
        finally:
            eccodes.codes_release(handle)

    def message(self, discipline: int, section4: bytes, data: bytes) -> bytes:
        """A whole GRIB2 message from its sections (section 0 framed here)."""
        total = 16 + len(self.section1) + len(self.section3) + len(section4) + len(data) + 4
        indicator = b"GRIB\x00\x00" + bytes((discipline, 2)) + total.to_bytes(8, "big")
        return b"".join((indicator, self.section1, self.section3, section4, data, b"7777"))


# ------------------------------------------------------------------------------------------
# Hours and runs
# ------------------------------------------------------------------------------------------


def _assign_recipes(
    model: Model, planned: list[PlannedMessage], run_time: datetime
) -> dict[int, str]:
    """Which messages carry which catalog variable's field (by its .idx search pattern)."""
    hour = planned[0].end if planned else 0
    lines = [
        f"{number}:0:d={run_time:%Y%m%d%H}:{pm.inventory}:"
        for number, pm in enumerate(planned, 1)
    ]
    assigned: dict[int, str] = {}
    for variable in model.variables.values():
        if variable.name not in FIELD_RECIPES or not variable.present_at(hour):
            continue
        for index, line in enumerate(lines):
            if variable.pattern.search(line):
                assigned[index] = variable.name
    # The other statistics of the same quantity (APCP's last-hour bucket next to its run
    # total) come from the same recipe, so buckets and totals agree.
    keys = {
        (planned[i].entry.variable, planned[i].entry.level, planned[i].entry.statistic): name
        for i, name in assigned.items()
    }
    for index, pm in enumerate(planned):
        key = (pm.entry.variable, pm.entry.level, pm.entry.statistic)
        if index not in assigned and pm.entry.statistic is not None and key in keys:
            assigned[index] = keys[key]
    return assigned


def _generate_hour(encoder: _Encoder, model: Model, ctx: _Context, hour: int) -> bytes:
    ctx.hour_cache.clear()
    planned = plan_hour(model.name, hour)
    assigned = _assign_recipes(model, planned, ctx.run_time)
    geometry = ctx.geometry
    data_cache: dict[Any, bytes] = {}

    def data_for(index: int, pm: PlannedMessage) -> bytes:
        name = assigned.get(index)
        if name is not None:
            key: Any = ("field", name, pm.start, pm.end)
            if key not in data_cache:
                values = _cached(ctx, name, pm)
                low_high = model.variables[name].valid_range
                if low_high is not None:
                    values = np.clip(values, *low_high)
                data_cache[key] = encoder.data_sections(values, FIELD_RECIPES[name].step)
            return data_cache[key]
        if pm.entry.statistic is not None and pm.start == pm.end:
            key = "zero"  # nothing accumulates (or peaks) over a zero-length range
            if key not in data_cache:
                data_cache[key] = encoder.data_sections(np.zeros(geometry.shape), _FILLER_STEP)
            return data_cache[key]
        key = "ice" if _is_sea_ice(pm.entry) else "filler"
        if key not in data_cache:
            filler = _filler(ctx, hour)
            missing = np.abs(geometry.lat) < 45.0 if key == "ice" else None
            data_cache[key] = encoder.data_sections(filler, _FILLER_STEP, missing)
        return data_cache[key]

    messages = []
    for index, pm in enumerate(planned):
        parameter = grib.parameter_codes(pm.entry.variable)
        section4 = encoder.product_section(pm, parameter)
        messages.append(encoder.message(parameter[0], section4, data_for(index, pm)))
    return b"".join(messages)


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace, so readers never
    see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a file server must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_run(
    root: Path,
    model_name: str,
    run: str,
    hours: Iterable[int],
    *,
    bucket_layout: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the GRIB2 file and `.idx` of each hour of a run below `root`; return their paths.

    Files land at `root/<bucket>/<relative path>` (`root/<relative path>` without
    `bucket_layout`), the `.idx` next to its GRIB file and written after it.  Hours outside
    the model's range for the run raise InvalidRequest.
    """
    model = load_catalog().model(model_name)
    run_time = model.validate_run(run)
    hours = list(hours)
    for hour in hours:
        model.validate_hour(run, hour)
    _template_entries(model.name)  # fail early on models without a template
    ctx = _Context(model.name, run_time, seed, _geometry(_grid_key(model.grid)))
    base = Path(root) / _bucket(model) if bucket_layout else Path(root)
    written: list[Path] = []
    with _Encoder(model, run_time) as encoder:
        for hour in hours:
            started = time.perf_counter()
            payload = _generate_hour(encoder, model, ctx, hour)
            index = grib.build_index(payload, run_time=run_time)
            path = base / model.relative_path(run_time, hour)
            idx_path = path.with_name(path.name + ".idx")
            _write_atomic(path, payload)
            _write_atomic(idx_path, index.encode())
            written += [path, idx_path]
            if progress is not None:
                progress(
                    f"{model.name} {run} f{hour:03d}: {index.count(chr(10))} messages, "
                    f"{len(payload) / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s "
                    f"-> {path}"
                )
    return written
