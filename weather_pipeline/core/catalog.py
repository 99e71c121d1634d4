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


def _build_model(name: str, raw: Mapping[str, Any]) -> Model:
    try:
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
        return Model(
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
    except (KeyError, TypeError, re.error) as exc:
        raise CatalogError(f"catalog entry for model {name!r} is malformed: {exc!r}") from None


def build_catalog(raw: Mapping[str, Any]) -> Catalog:
    models = {name: _build_model(name, m) for name, m in raw.get("models", {}).items()}
    sources = {
        name: Source(
            name=name,
            title=s.get("title", name),
            requests_per_minute=s.get("requests_per_minute"),
            keeps_hours=s.get("keeps_hours"),
            listing=s.get("listing"),
        )
        for name, s in raw.get("sources", {}).items()
    }
    regions = {}
    for name, r in raw.get("regions", {}).items():
        try:
            bbox = tuple(float(x) for x in r["bbox"])
            if len(bbox) != 4:
                raise ValueError("bbox needs 4 numbers W,S,E,N")
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
        except (KeyError, TypeError, ValueError) as exc:
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
