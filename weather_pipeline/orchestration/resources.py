"""Dagster resources: the cache root and the NOAA sources, configured from the environment.

| variable                       | default       | meaning                                    |
|--------------------------------|---------------|--------------------------------------------|
| WEATHER_PIPELINE_CACHE         | ./cache       | cache root (nothing is written outside it) |
| WEATHER_PIPELINE_SOURCES       | aws,nomads    | sources in order of preference             |
| WEATHER_PIPELINE_MIRROR_URL    | (none)        | base URL of `weather-pipeline mirror serve`|
| WEATHER_PIPELINE_RATE_LIMITS   | (none)        | extra per-host limits, "host=rpm,..."      |
| WEATHER_PIPELINE_RATE_LIMIT_DB | $TMPDIR/...   | the machine-wide rate-limit bucket         |
| WEATHER_PIPELINE_HTTP_ATTEMPTS | 5             | HTTP attempts per request (with backoff)   |
| WEATHER_PIPELINE_HTTP_BACKOFF_S| 1.0           | first backoff wait, doubled per attempt    |
| WEATHER_PIPELINE_BREAKER_FAILURES | 3          | unreachable attempts that open a circuit   |
| WEATHER_PIPELINE_BREAKER_COOLDOWN_S | 60       | how long an open circuit answers at once   |
| WEATHER_PIPELINE_HOURS_AT_ONCE | 4             | hours of a batch fetched at once           |
| WEATHER_PIPELINE_CONNECTIONS_PER_HOST | 8      | requests in flight per server (process)    |
| WEATHER_PIPELINE_TILE_METHOD   | bilinear      | regridding method (bilinear or nearest)    |
| WEATHER_PIPELINE_KEEP_GRIBS    | (catalog)     | "all", or models whose GRIBs to keep       |
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import CatalogError, Model
from weather_pipeline.core.http import HttpClient, HttpConfig, RetryPolicy
from weather_pipeline.core.sources import SourceSettings, rate_limits, redirect_hosts


class CacheResource(ConfigurableResource):
    """Where the cache lives."""

    root: str = "cache"

    def layout(self) -> CacheLayout:
        return CacheLayout(Path(self.root))


class NoaaSourceResource(ConfigurableResource):
    """Which NOAA sources to read, and how politely."""

    sources: str = "aws,nomads"
    mirror_url: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    initial_backoff: float = 1.0
    extra_rate_limits: str = ""
    rate_limit_db: str = ""
    allow_full_download: bool = True
    breaker_failures: int = 3
    breaker_cooldown_s: float = 60.0
    #: hours of a batch fetched at once, and requests in flight per server (all threads)
    hours_at_once: int = 4
    connections_per_host: int = 8

    def source_settings(self) -> SourceSettings:
        return SourceSettings.parse(self.sources, self.mirror_url or None)

    def http_config(self) -> HttpConfig:
        settings = self.source_settings()
        base = HttpConfig()
        return HttpConfig(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retry=RetryPolicy(max_attempts=self.max_attempts, initial_wait=self.initial_backoff),
            rate_limits=rate_limits(settings, extra=parse_rate_limits(self.extra_rate_limits)),
            rate_limit_db=Path(self.rate_limit_db) if self.rate_limit_db else base.rate_limit_db,
            breaker_failures=self.breaker_failures,
            breaker_cooldown_s=self.breaker_cooldown_s,
            redirect_hosts=redirect_hosts(settings),
            max_connections_per_host=self.connections_per_host,
        )

    def client(self) -> HttpClient:
        return HttpClient(self.http_config())


class TileSettings(ConfigurableResource):
    """How tiles are built, and which models keep their GRIB subsets after tiling."""

    method: str = "bilinear"
    keep_gribs: str = ""  # "all", or comma-separated model names; adds to the catalog's keep_gribs

    def keeps_gribs(self, model: Model) -> bool:
        names = {n.strip() for n in self.keep_gribs.split(",") if n.strip()}
        return model.keep_gribs or "all" in names or model.name in names


def parse_rate_limits(spec: str) -> dict[str, int]:
    """"127.0.0.1=600,example.org=60" -> {"127.0.0.1": 600, "example.org": 60}."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        host, _, rpm = part.partition("=")
        if not host or not rpm.isdigit() or int(rpm) < 1:
            raise CatalogError(f"bad rate limit {part!r}: expected HOST=REQUESTS_PER_MINUTE")
        limits[host] = int(rpm)
    return limits


def resources_from_env(env: dict[str, str] | None = None) -> dict[str, ConfigurableResource]:
    env = dict(os.environ if env is None else env)
    return {
        "cache": CacheResource(root=env.get("WEATHER_PIPELINE_CACHE", "cache")),
        "noaa": NoaaSourceResource(
            sources=env.get("WEATHER_PIPELINE_SOURCES", "aws,nomads"),
            mirror_url=env.get("WEATHER_PIPELINE_MIRROR_URL", ""),
            extra_rate_limits=env.get("WEATHER_PIPELINE_RATE_LIMITS", ""),
            rate_limit_db=env.get("WEATHER_PIPELINE_RATE_LIMIT_DB", ""),
            max_attempts=int(env.get("WEATHER_PIPELINE_HTTP_ATTEMPTS", "5")),
            initial_backoff=float(env.get("WEATHER_PIPELINE_HTTP_BACKOFF_S", "1.0")),
            breaker_failures=int(env.get("WEATHER_PIPELINE_BREAKER_FAILURES", "3")),
            breaker_cooldown_s=float(env.get("WEATHER_PIPELINE_BREAKER_COOLDOWN_S", "60")),
            hours_at_once=int(env.get("WEATHER_PIPELINE_HOURS_AT_ONCE", "4")),
            connections_per_host=int(env.get("WEATHER_PIPELINE_CONNECTIONS_PER_HOST", "8")),
        ),
        "tiling": TileSettings(
            method=env.get("WEATHER_PIPELINE_TILE_METHOD", "bilinear"),
            keep_gribs=env.get("WEATHER_PIPELINE_KEEP_GRIBS", ""),
        ),
    }
