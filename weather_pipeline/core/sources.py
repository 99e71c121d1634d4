"""Which source to ask for a model run, and the HTTP settings that follow from the catalog.

Policy (DESIGN.md section 3): prefer the AWS open-data bucket; NOMADS only for the newest
runs (it keeps about two days and blocks heavy clients), always rate limited; the Google
mirror when configured; the local mirror for offline work, through the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from weather_pipeline.core.catalog import Catalog, CatalogError, Model, load_catalog

DEFAULT_SOURCE_ORDER = ("aws", "nomads")


class SourceUnavailable(LookupError):
    """No configured source can have this run (too old for NOMADS, before an archive...)."""


@dataclass(frozen=True)
class SourceSettings:
    """Which sources to use, in order of preference, and where the local mirror is."""

    order: tuple[str, ...] = DEFAULT_SOURCE_ORDER
    mirror_url: str | None = None

    @classmethod
    def parse(cls, order: str | None, mirror_url: str | None, catalog: Catalog | None = None) -> "SourceSettings":
        """From a comma-separated list such as "aws,nomads" or "mirror"; names are checked."""
        catalog = catalog or load_catalog()
        names = tuple(s.strip() for s in (order or ",".join(DEFAULT_SOURCE_ORDER)).split(",") if s.strip())
        if not names:
            raise CatalogError("the source list is empty; name at least one of: " + ", ".join(catalog.sources))
        for name in names:
            catalog.source(name)
        if "mirror" in names and not mirror_url:
            raise CatalogError("source 'mirror' needs a mirror URL (set WEATHER_PIPELINE_MIRROR_URL)")
        return cls(order=names, mirror_url=mirror_url or None)


@dataclass(frozen=True)
class SourceChoice:
    source: str
    base_url: str

    def url(self, model: Model, run: str | datetime, hour: int) -> str:
        return f"{self.base_url}/{model.relative_path(run, hour)}"


def candidate_sources(
    model: Model,
    run_time: datetime,
    settings: SourceSettings,
    *,
    catalog: Catalog | None = None,
    now: datetime | None = None,
) -> list[SourceChoice]:
    """The sources that may have this run, best first; SourceUnavailable if none may."""
    catalog = catalog or load_catalog()
    now = now or datetime.now(timezone.utc)
    choices, skipped = [], []
    for name in settings.order:
        if name not in model.urls:
            skipped.append(f"{name}: does not publish {model.name}")
            continue
        source = catalog.source(name)
        since = model.available_since.get(name)
        if since and run_time.date() < since:
            skipped.append(f"{name}: archive starts {since.isoformat()}")
            continue
        if source.keeps_hours is not None and now - run_time > timedelta(hours=source.keeps_hours):
            skipped.append(f"{name}: keeps only the last {source.keeps_hours} h")
            continue
        choices.append(SourceChoice(name, model.base_url(name, settings.mirror_url)))
    if not choices:
        raise SourceUnavailable(
            f"no configured source can have {model.name} run {run_time:%Y%m%d_%H} ({'; '.join(skipped)})"
        )
    return choices


def rate_limits(settings: SourceSettings, catalog: Catalog | None = None, extra: dict[str, int] | None = None) -> dict[str, int]:
    """Requests-per-minute limits by host, for every configured source that has one."""
    catalog = catalog or load_catalog()
    limits: dict[str, int] = {}
    for model in catalog.models.values():
        for name in settings.order:
            rpm = catalog.source(name).requests_per_minute
            if rpm and name in model.urls:
                host = urlsplit(model.base_url(name, settings.mirror_url)).hostname
                if host:
                    limits[host] = min(rpm, limits.get(host, rpm))
    limits.update(extra or {})
    return limits


def redirect_hosts(settings: SourceSettings, catalog: Catalog | None = None) -> frozenset[str]:
    """Hosts the configured sources' redirects may lead to (the catalog's `redirect_hosts`)."""
    catalog = catalog or load_catalog()
    return frozenset(h for name in settings.order for h in catalog.source(name).redirect_hosts)
