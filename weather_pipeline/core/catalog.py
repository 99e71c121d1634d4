"""The model catalog: typed access to `catalog.toml` (plus an optional user overlay).

Every model fact the pipeline uses (run cadence, forecast hours, file paths, source URLs,
grid, variables and their .idx patterns) comes from here, so adding a model or a variable
is a catalog entry, not code.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

CATALOG_PATH = Path(__file__).with_name("catalog.toml")
#: Environment variable naming a TOML file merged over the embedded catalog.
OVERLAY_ENV = "WEATHER_PIPELINE_CATALOG"

RUN_KEY_FORMAT = "%Y%m%d_%H"
_RUN_KEY_RE = re.compile(r"^(\d{8})_(\d{2})$")
#: sanity limits for values an overlay may set (the catalog is input like any other)
MAX_FORECAST_HOUR = 1000
MAX_TILE_POINTS = 50_000_000  # a region at a resolution: ~200 MB of float32
#: how many spans of its valid range a decoded value may lie outside it before it is corrupt
CORRUPTION_ENVELOPE = 10.0
_TEMPLATE_FIELDS = {"date", "cycle", "hour"}


class CatalogError(ValueError):
    """An unknown model, variable, region or source, or a malformed catalog entry."""


class InvalidRequest(ValueError):
    """A request the catalog can name but that is not valid (bad run key, hour out of range)."""


def parse_hours(spec: str | list[int]) -> tuple[int, ...]:
    """Parse "0-120,123-384/3" (or a list of ints) into a sorted tuple of unique hours."""
    if isinstance(spec, list):
        return tuple(sorted({int(h) for h in spec}))
    hours: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?:/(\d+))?)?", part)
        if not m:
            raise CatalogError(f"bad hour list element {part!r} in {spec!r}")
        start = int(m.group(1))
        stop = int(m.group(2)) if m.group(2) else start
        step = int(m.group(3)) if m.group(3) else 1
        if stop < start or step < 1:
            raise CatalogError(f"bad hour range {part!r} in {spec!r}")
        hours.update(range(start, stop + 1, step))
    return tuple(sorted(hours))


def parse_run_key(run: str) -> datetime:
    """`YYYYMMDD_HH` -> an aware UTC datetime; InvalidRequest naming the key otherwise."""
    m = _RUN_KEY_RE.match(run or "")
    if not m:
        raise InvalidRequest(f"malformed run key {run!r}: expected YYYYMMDD_HH, e.g. 20230125_12")
    try:
        return datetime.strptime(run, RUN_KEY_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise InvalidRequest(f"malformed run key {run!r}: {exc}") from None


def format_run_key(run_time: datetime) -> str:
    return run_time.astimezone(timezone.utc).strftime(RUN_KEY_FORMAT)


@dataclass(frozen=True)
class Variable:
    name: str
    long_name: str
    search: str
    units: str
    valid_range: tuple[float, float] | None = None
    accumulation: str | None = None
    first_hour: int = 0
    default: bool = True
    wind: str | None = None  # "u" or "v" for a wind component
    pair: str | None = None  # the other component's variable name

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.search)

    @property
    def plausible_range(self) -> tuple[float, float] | None:
        """Values beyond this cannot be real: `valid_range` widened by CORRUPTION_ENVELOPE spans.

        GRIB2 has no checksum and eccodes decodes damaged data sections happily, but with NOAA's
        spatial-differencing packing damage is integrated into every later value, which lands
        orders of magnitude outside; a generous envelope never rejects a real fill value.
        """
        if self.valid_range is None:
            return None
        low, high = self.valid_range
        span = high - low
        return (low - CORRUPTION_ENVELOPE * span, high + CORRUPTION_ENVELOPE * span)

    def present_at(self, hour: int) -> bool:
        """Whether the model publishes this variable at this forecast hour (GFS f000 has no APCP)."""
        return hour >= self.first_hour


@dataclass(frozen=True)
class PathRule:
    template: str
    since: date | None = None


@dataclass(frozen=True)
class Horizon:
    run_hours: tuple[int, ...]
    forecast_hours: tuple[int, ...]


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    requests_per_minute: int | None = None
    keeps_hours: int | None = None
    listing: str | None = None  # "s3": supports ListObjectsV2 (one request lists a run)
    redirect_hosts: tuple[str, ...] = ()  # hosts its redirects may lead to (besides its own)


@dataclass(frozen=True)
class Model:
    name: str
    title: str
    run_hours: tuple[int, ...]
    horizons: tuple[Horizon, ...]
    paths: tuple[PathRule, ...]
    urls: Mapping[str, str]
    available_since: Mapping[str, date]
    grid: Mapping[str, Any]
    variables: Mapping[str, Variable]
    keep_gribs: bool = False
    retention_hours: int = 48
    scan_lookback_hours: int = 6
    publish_window_hours: int = 3

    # -- runs and hours ------------------------------------------------------------------
    @property
    def all_hours(self) -> tuple[int, ...]:
        """Every forecast hour of any run: the static hour partition dimension."""
        return tuple(sorted({h for hz in self.horizons for h in hz.forecast_hours}))

    def hours_for_run(self, run: str | datetime) -> tuple[int, ...]:
        run_time = parse_run_key(run) if isinstance(run, str) else run
        for hz in self.horizons:
            if run_time.hour in hz.run_hours:
                return hz.forecast_hours
        return ()

    def validate_run(self, run: str) -> datetime:
        """Parse and check a run key against this model's cycles."""
        run_time = parse_run_key(run)
        if run_time.hour not in self.run_hours:
            raise InvalidRequest(
                f"{self.name} has no {run_time.hour:02d}z run (run {run!r}); "
                f"its runs start at {format_hours(self.run_hours)}z"
            )
        return run_time

    def validate_hour(self, run: str, hour: int) -> None:
        run_time = self.validate_run(run)
        hours = self.hours_for_run(run_time)
        if hour not in hours:
            raise InvalidRequest(
                f"forecast hour {hour} is outside {self.name}'s range for a "
                f"{run_time.hour:02d}z run ({format_hours(hours)})"
            )

    def latest_run_before(self, now: datetime) -> datetime:
        """The newest run time at or before `now` (UTC)."""
        t = now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        for _ in range(48):
            if t.hour in self.run_hours:
                return t
            t -= timedelta(hours=1)
        raise CatalogError(f"{self.name} has no run hours")

    # -- variables -----------------------------------------------------------------------
    @property
    def default_variables(self) -> tuple[Variable, ...]:
        return tuple(v for v in self.variables.values() if v.default)

    def variable(self, name: str) -> Variable:
        try:
            return self.variables[name]
        except KeyError:
            raise CatalogError(
                f"unknown variable {name!r} for model {self.name}; "
                f"known: {', '.join(sorted(self.variables))}"
            ) from None

    def select_variables(self, names: list[str] | tuple[str, ...] | None) -> tuple[Variable, ...]:
        if not names:
            return self.default_variables
        return tuple(self.variable(n) for n in names)

    # -- paths and URLs ------------------------------------------------------------------
    def relative_path(self, run: str | datetime, hour: int) -> str:
        """The file's path below a source's base URL, as NOAA names it."""
        run_time = parse_run_key(run) if isinstance(run, str) else run
        for rule in self.paths:
            if rule.since is None or run_time.date() >= rule.since:
                return rule.template.format(
                    date=run_time.strftime("%Y%m%d"), cycle=run_time.strftime("%H"), hour=hour
                )
        raise CatalogError(f"{self.name} has no path template for run {format_run_key(run_time)}")

    def base_url(self, source: str, mirror_url: str | None = None) -> str:
        try:
            template = self.urls[source]
        except KeyError:
            raise CatalogError(
                f"model {self.name} is not published on source {source!r}; "
                f"it is on: {', '.join(sorted(self.urls))}"
            ) from None
        if "{mirror}" in template:
            if not mirror_url:
                raise CatalogError(
                    "source 'mirror' needs a mirror URL (set WEATHER_PIPELINE_MIRROR_URL)"
                )
            template = template.replace("{mirror}", mirror_url.rstrip("/"))
        return template.rstrip("/")

    def url(self, source: str, run: str | datetime, hour: int, mirror_url: str | None = None) -> str:
        return f"{self.base_url(source, mirror_url)}/{self.relative_path(run, hour)}"


@dataclass(frozen=True)
class Region:
    name: str
    title: str
    bbox: tuple[float, float, float, float]  # W, S, E, N
    resolutions: tuple[float, ...]
    models: tuple[str, ...]
    max_nan_fraction: float = 0.0


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, Model]
    sources: Mapping[str, Source]
    regions: Mapping[str, Region] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def region(self, name: str) -> Region:
        try:
            return self.regions[name]
        except KeyError:
            raise CatalogError(
                f"unknown region {name!r}; known regions: {', '.join(sorted(self.regions))}"
            ) from None

    def regions_for(self, model_name: str) -> tuple[Region, ...]:
        return tuple(r for r in self.regions.values() if model_name in r.models)

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise CatalogError(
                f"unknown model {name!r}; known models: {', '.join(sorted(self.models))}"
            ) from None

    def source(self, name: str) -> Source:
        try:
            return self.sources[name]
        except KeyError:
            raise CatalogError(
                f"unknown source {name!r}; known sources: {', '.join(sorted(self.sources))}"
            ) from None


def format_hours(hours: tuple[int, ...]) -> str:
    """Compact form of an hour list: (0, 1, 2, 3, 6, 9) -> '0-3,6,9'."""
    if not hours:
        return "none"
    parts, start, prev = [], hours[0], hours[0]
    for h in hours[1:] + (None,):  # type: ignore[operator]
        if h is not None and h == prev + 1:
            prev = h
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if h is not None:
            start = prev = h
    return ",".join(parts)


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _check_template(model: str, template: str) -> None:
    import string

    parts = template.split("/")
    if template.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in template:
        raise KeyError(f"path template {template!r} must be a relative path without '.', '..' or empty parts")
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    unknown = fields - _TEMPLATE_FIELDS
    if unknown:
        raise KeyError(f"path template {template!r} uses unknown fields {sorted(unknown)} (known: date, cycle, hour)")


def _check_url(source: str, url: Any) -> None:
    from urllib.parse import urlsplit

    text = str(url).replace("{mirror}", "http://mirror")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise KeyError(f"url for source {source!r} must be http(s)://host/..., not {url!r}")


def _build_model(name: str, raw: Mapping[str, Any]) -> Model:
    from weather_pipeline.core.cache import UnsafePath, check_name

    try:
        check_name("model", name)
        for vname in raw.get("variables", {}):
            check_name("variable", vname)
        variables = {
            vname: Variable(
                name=vname,
                long_name=v.get("long_name", vname),
                search=v["search"],
                units=v.get("units", ""),
                valid_range=tuple(v["valid_range"]) if "valid_range" in v else None,
                accumulation=v.get("accumulation"),
                first_hour=int(v.get("first_hour", 0)),
                default=bool(v.get("default", True)),
                wind=v.get("wind"),
                pair=v.get("pair"),
            )
            for vname, v in raw.get("variables", {}).items()
        }
        for v in variables.values():
            re.compile(v.search)
            if v.pair and (v.pair not in variables or v.wind not in ("u", "v")):
                raise KeyError(f"variable {v.name}: pair {v.pair!r} must name a variable and wind be 'u' or 'v'")
            if v.valid_range is not None and not (len(v.valid_range) == 2 and v.valid_range[0] < v.valid_range[1]):
                raise KeyError(f"variable {v.name}: valid_range must be [low, high] with low < high")
            if v.accumulation is not None and not re.fullmatch(r"run_total|\d{1,3}h", str(v.accumulation)):
                raise KeyError(f"variable {v.name}: accumulation must be 'run_total' or 'Nh' (an N-hour bucket)")
        for p in raw["paths"]:
            _check_template(name, p["template"])
        for source, url in raw.get("urls", {}).items():
            _check_url(source, url)
        model = Model(
            name=name,
            title=raw.get("title", name),
            run_hours=parse_hours(raw["run_hours"]),
            horizons=tuple(
                Horizon(parse_hours(h["run_hours"]), parse_hours(h["forecast_hours"]))
                for h in raw["horizons"]
            ),
            paths=tuple(
                PathRule(p["template"], _parse_date(p["since"]) if "since" in p else None)
                for p in raw["paths"]
            ),
            urls=dict(raw.get("urls", {})),
            available_since={k: _parse_date(v) for k, v in raw.get("available_since", {}).items()},
            grid=dict(raw.get("grid", {})),
            variables=variables,
            keep_gribs=bool(raw.get("keep_gribs", False)),
            retention_hours=int(raw.get("retention_hours", 48)),
            scan_lookback_hours=int(raw.get("scan_lookback_hours", 6)),
            publish_window_hours=int(raw.get("publish_window_hours", 3)),
        )
        if not model.run_hours or not set(model.run_hours) <= set(range(24)):
            raise KeyError(f"run_hours must be hours of the day 0-23, not {format_hours(model.run_hours)}")
        if model.all_hours and model.all_hours[-1] > MAX_FORECAST_HOUR:
            raise KeyError(f"forecast hours go up to {model.all_hours[-1]}, over the limit of {MAX_FORECAST_HOUR}")
        for field_name in ("retention_hours", "scan_lookback_hours", "publish_window_hours"):
            if not 0 < getattr(model, field_name) <= 24 * 365:
                raise KeyError(f"{field_name} must be between 1 and {24 * 365} hours")
        return model
    except UnsafePath as exc:
        raise CatalogError(f"catalog entry for model {name!r}: {exc}") from None
    except (KeyError, TypeError, ValueError, re.error) as exc:
        raise CatalogError(f"catalog entry for model {name!r} is malformed: {exc!r}") from None


def build_catalog(raw: Mapping[str, Any]) -> Catalog:
    models = {name: _build_model(name, m) for name, m in raw.get("models", {}).items()}
    sources = {}
    for name, s in raw.get("sources", {}).items():
        try:
            rpm = s.get("requests_per_minute")
            if rpm is not None and not (isinstance(rpm, int) and 0 < rpm <= 100_000):
                raise ValueError(f"requests_per_minute must be a positive integer, not {rpm!r}")
            hosts = s.get("redirect_hosts", [])
            if not (isinstance(hosts, list) and all(isinstance(h, str) and re.fullmatch(r"[A-Za-z0-9.-]+", h) for h in hosts)):
                raise ValueError("redirect_hosts must be a list of host names")
            sources[name] = Source(
                name=name,
                title=s.get("title", name),
                requests_per_minute=rpm,
                keeps_hours=s.get("keeps_hours"),
                listing=s.get("listing"),
                redirect_hosts=tuple(hosts),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise CatalogError(f"catalog entry for source {name!r} is malformed: {exc}") from None
    from weather_pipeline.core.cache import UnsafePath, check_name

    regions = {}
    for name, r in raw.get("regions", {}).items():
        try:
            check_name("region", name)
            bbox = tuple(float(x) for x in r["bbox"])
            if len(bbox) != 4:
                raise ValueError("bbox needs 4 numbers W,S,E,N")
            west, south, east, north = bbox
            if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
                raise ValueError(f"bbox {list(bbox)} must have -180 <= W < E <= 180 and -90 <= S < N <= 90")
            for res in r["resolutions"]:
                res = float(res)
                points = ((east - west) / res + 1) * ((north - south) / res + 1) if res > 0 else float("inf")
                if not (res > 0 and points <= MAX_TILE_POINTS):
                    raise ValueError(f"resolution {res:g} gives {points:.3g} points per tile, over the limit of "
                                     f"{MAX_TILE_POINTS:.3g} (or is not positive)")
            unknown = [m for m in r.get("models", list(models)) if m not in models]
            if unknown:
                raise ValueError(f"unknown models {unknown}")
            regions[name] = Region(
                name=name,
                title=r.get("title", name),
                bbox=bbox,  # type: ignore[arg-type]
                resolutions=tuple(float(x) for x in r["resolutions"]),
                models=tuple(r.get("models", list(models))),
                max_nan_fraction=float(r.get("max_nan_fraction", 0.0)),
            )
        except (KeyError, TypeError, ValueError, UnsafePath) as exc:
            raise CatalogError(f"catalog entry for region {name!r} is malformed: {exc}") from None
    return Catalog(models=models, sources=sources, regions=regions, raw=raw)


@lru_cache(maxsize=4)
def _load(overlay_path: str | None) -> Catalog:
    raw = tomllib.loads(CATALOG_PATH.read_text())
    if overlay_path:
        path = Path(overlay_path)
        if not path.is_file():
            raise CatalogError(f"{OVERLAY_ENV}={overlay_path!r} does not name a readable file")
        try:
            raw = _merge(raw, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"catalog overlay {overlay_path!r} is not valid TOML: {exc}") from None
    return build_catalog(raw)


def load_catalog() -> Catalog:
    """The embedded catalog, with the overlay named by WEATHER_PIPELINE_CATALOG merged over it."""
    return _load(os.environ.get(OVERLAY_ENV) or None)
