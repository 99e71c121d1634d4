"""ScanSource: which forecast hours of recent model runs a source has published.

A Dagster sensor calls this every tick, so each check must be cheap and bounded:

- Sources whose catalog entry says `listing = "s3"` (the AWS buckets, the local mirror) answer
  "which files of this run exist" with one ListObjectsV2 request per run (more only when the
  listing is paginated).
- Other sources (NOMADS serves HTML directory pages, no listing) are probed with one HEAD of
  the `.idx` per hour, in increasing hour order, stopping at the first missing hour (hours are
  published in order) and never beyond a request budget; NOMADS blocks heavy clients.

An hour counts only when its `.idx` exists as well as the GRIB file: NOAA (and our mirror
generator) writes the `.idx` after the GRIB, so a GRIB alone may still be being written.

A source that cannot be reached (connection refused, no DNS, connect timeout, its circuit
open) is *unreachable*, never "has nothing": the next source is asked, and when none answers
the result says `unreachable` and keeps no hours, so the stored record of what the source had
is not overwritten. A source that asks us to wait (a long Retry-After) is treated the same way
until the time it named.

What was found is kept per model in `cache.source_availability_path(model)` (one JSON file,
written atomically, runs past the model's retention pruned), with each source's reachability
(`sources`: reachable or not, since when, the last error), which deep status reads to say
"the source has 48 h, we have 40 h" or "aws unreachable since 12:03Z".  Pure core: no Dagster.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Collection, Iterable, Mapping, Sequence
from urllib.parse import quote, urlencode

from weather_pipeline.core.cache import CacheLayout, atomic_write_text
from weather_pipeline.core.catalog import (
    Catalog,
    InvalidRequest,
    Model,
    format_run_key,
    load_catalog,
    parse_run_key,
)
from weather_pipeline.core.http import FetchError, HttpClient, NotFound, RetryLater, Unreachable
from weather_pipeline.core.sources import SourceChoice, SourceSettings, SourceUnavailable, candidate_sources

log = logging.getLogger(__name__)

#: Version of the availability file's layout, so a reader can tell what it is looking at.
AVAILABILITY_FORMAT = 1


# ------------------------------------------------------------------------------------------
# Runs to look at
# ------------------------------------------------------------------------------------------


def candidate_runs(
    model: Model | str,
    now: datetime,
    *,
    lookback_hours: int | None = None,
    catalog: Catalog | None = None,
) -> list[str]:
    """Run keys (`YYYYMMDD_HH`) of the model's runs with run time in (now - lookback, now].

    Newest first; `lookback_hours` defaults to the model's `scan_lookback_hours`.
    `now` must be timezone-aware (a naive time is ambiguous and raises ValueError).
    """
    m = _resolve_model(model, catalog)
    now = _aware_utc(now)
    lookback = m.scan_lookback_hours if lookback_hours is None else lookback_hours
    if lookback < 0:
        raise ValueError(f"lookback_hours must not be negative, got {lookback}")
    oldest = now - timedelta(hours=lookback)
    runs: list[str] = []
    t = now.replace(minute=0, second=0, microsecond=0)
    while t > oldest:
        if t.hour in m.run_hours:
            runs.append(format_run_key(t))
        t -= timedelta(hours=1)
    return runs


# ------------------------------------------------------------------------------------------
# What a source has of one run
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAvailability:
    """The forecast hours of one model run that a source has published, as of `checked_at`.

    `source` is the source that answered (None when no configured source can have the run);
    `hours` the sorted hours whose GRIB and `.idx` both exist there; `expected` every hour of
    the run.  `truncated` means the check stopped before it could tell whether more hours
    exist (request budget spent, or a request failed); `error` says what failed, if anything.
    `requests` is what the check cost, every HTTP attempt (retries, redirects) included.
    `unreachable` names the sources that could not be asked at all (refused, no DNS, timeout,
    circuit open, a wait order); when every source is, `hours` is empty and means nothing.
    """

    model: str
    run: str
    source: str | None
    hours: tuple[int, ...]
    expected: tuple[int, ...]
    checked_at: str
    requests: int = 0
    truncated: bool = False
    error: str | None = None
    unreachable: tuple[str, ...] = ()

    @property
    def answered(self) -> bool:
        """Some source answered (its hours mean something), or none was configured at all."""
        return self.source is None or self.source not in self.unreachable

    @property
    def complete(self) -> bool:
        """Every hour of the run is published."""
        return self.hours == self.expected

    @property
    def missing(self) -> tuple[int, ...]:
        """Expected hours not (yet) published, in order."""
        have = set(self.hours)
        return tuple(h for h in self.expected if h not in have)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict; `complete` is included for readers, ignored by `from_json`."""
        return {
            "model": self.model,
            "run": self.run,
            "source": self.source,
            "hours": list(self.hours),
            "expected": list(self.expected),
            "complete": self.complete,
            "checked_at": self.checked_at,
            "requests": self.requests,
            "truncated": self.truncated,
            "error": self.error,
            "unreachable": list(self.unreachable),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunAvailability":
        """The inverse of `as_json`; ValueError/KeyError/TypeError on malformed data."""
        run = str(data["run"])
        parse_run_key(run)  # fail on a malformed key here, not in some later reader
        return cls(
            model=str(data["model"]),
            run=run,
            source=None if data.get("source") is None else str(data["source"]),
            hours=tuple(sorted(int(h) for h in data["hours"])),
            expected=tuple(int(h) for h in data["expected"]),
            checked_at=str(data["checked_at"]),
            requests=int(data.get("requests", 0)),
            truncated=bool(data.get("truncated", False)),
            error=None if data.get("error") is None else str(data["error"]),
            unreachable=tuple(str(x) for x in data.get("unreachable", ())),
        )


@dataclass(frozen=True)
class ListPage:
    """One page of an S3 ListObjectsV2 answer."""

    keys: tuple[str, ...]
    is_truncated: bool
    next_token: str | None


def parse_list_objects(body: bytes | str) -> ListPage:
    """Parse a ListObjectsV2 XML answer, with or without the S3 namespace.

    ValueError if the body is not a ListBucketResult (an `<Error>` document, HTML...).
    """
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from None
    if _local(root.tag) != "ListBucketResult":
        raise ValueError(f"expected a ListBucketResult, got <{_local(root.tag)}>")
    keys: list[str] = []
    truncated = False
    token: str | None = None
    for child in root:
        name = _local(child.tag)
        if name == "Contents":
            key = next((c.text for c in child if _local(c.tag) == "Key"), None)
            if key:
                keys.append(key)
        elif name == "IsTruncated":
            truncated = (child.text or "").strip().lower() == "true"
        elif name == "NextContinuationToken":
            token = (child.text or "").strip() or None
    return ListPage(tuple(keys), truncated, token)


def published_hours(
    model: Model | str,
    run: str,
    client: HttpClient,
    settings: SourceSettings,
    *,
    now: datetime | None = None,
    max_requests: int = 20,
    catalog: Catalog | None = None,
    known_hours: Collection[int] = (),
    page_size: int | None = None,
) -> RunAvailability:
    """Ask the configured sources, best first, which hours of `run` they have published.

    The first source that has any hour is reported; if none has, the last one asked.  At
    most `max_requests` requests are issued over all sources (a retry inside the client is
    part of its request, but is counted in `requests`).

    `known_hours`: hours already seen published (for instance by the previous tick).  HEAD
    probing starts after the leading run of them, since published files stay, which lets a
    NOMADS-only setup get past `max_requests` hours over several ticks; listings ignore it.
    `page_size` asks a listing for at most that many keys per page (S3's default is 1000).
    """
    if max_requests < 1:
        raise ValueError(f"max_requests must be at least 1, got {max_requests}")
    catalog = catalog or load_catalog()
    m = _resolve_model(model, catalog)
    run_time = m.validate_run(run)
    expected = m.hours_for_run(run_time)
    now = _aware_utc(now or datetime.now(timezone.utc))
    requests_before = client.stats.requests

    def result(
        source: str | None, hours: tuple[int, ...], truncated: bool, error: str | None,
        unreachable: tuple[str, ...] = (),
    ) -> RunAvailability:
        return RunAvailability(
            model=m.name,
            run=run,
            source=source,
            hours=hours,
            expected=expected,
            checked_at=format_checked_at(now),
            requests=client.stats.requests - requests_before,
            truncated=truncated,
            error=error,
            unreachable=unreachable,
        )

    try:
        choices = candidate_sources(m, run_time, settings, catalog=catalog, now=now)
    except SourceUnavailable as exc:
        log.info("%s", exc)
        return result(None, (), False, None)

    budget = _Budget(max_requests)
    checked: list[_SourceResult] = []
    sources_left_unasked = False
    for choice in choices:
        if budget.left == 0:
            sources_left_unasked = True
            break
        try:
            if catalog.source(choice.source).listing == "s3":
                found = _check_by_listing(client, m, run_time, choice, expected, budget, page_size, known_hours)
            else:
                found = _check_by_probing(client, m, run_time, choice, expected, budget, known_hours)
        except (Unreachable, RetryLater) as exc:
            log.warning("%s %s: %s is unreachable: %s", m.name, run, choice.source, exc.reason)
            found = _SourceResult(choice.source, (), truncated=True, error=exc.reason, unreachable=True)
        checked.append(found)
        if found.hours:
            break
    errors = "; ".join(f"{r.source}: {r.error}" for r in checked if r.error) or None
    unreachable = tuple(r.source for r in checked if r.unreachable)
    answered = [r for r in checked if not r.unreachable]
    # the last source that answered, else the last one asked (unreachable: its hours mean nothing)
    chosen = answered[-1] if answered else checked[-1]
    return result(chosen.source, chosen.hours, chosen.truncated or sources_left_unasked, errors, unreachable)


def format_checked_at(moment: datetime) -> str:
    """ISO 8601 UTC with a Z, to the second: `2026-05-12T03:04:05Z`."""
    return _aware_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Budget:
    """Requests this check may still issue."""

    left: int

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass(frozen=True)
class _SourceResult:
    source: str
    hours: tuple[int, ...]
    truncated: bool = False
    error: str | None = None
    unreachable: bool = False


def _check_by_listing(
    client: HttpClient,
    model: Model,
    run_time: datetime,
    choice: SourceChoice,
    expected: tuple[int, ...],
    budget: _Budget,
    page_size: int | None,
    known_hours: Collection[int],
) -> _SourceResult:
    """One ListObjectsV2 request (per page) over the run's common key prefix."""
    paths = {h: model.relative_path(run_time, h) for h in expected}
    # The longest common prefix of the run's files, e.g. "hrrr.20260512/conus/hrrr.t00z.wrfsfcf":
    # narrow enough to exclude the bucket's other products, one page for a whole run.
    prefix = os.path.commonprefix(list(paths.values()))
    keys: set[str] = set()
    token: str | None = None
    truncated = False
    error: str | None = None
    first = True
    while True:
        if not budget.take():
            truncated = True
            break
        url = _listing_url(choice.base_url, prefix, token, page_size)
        try:
            page = parse_list_objects(client.get_bytes(url))
        except NotFound as exc:
            if first:
                # A bucket that refuses listing (403) can still answer HEADs.
                log.warning("%s refused the listing (%s); probing hours one by one", choice.source, exc)
                return _check_by_probing(client, model, run_time, choice, expected, budget, known_hours)
            truncated, error = True, str(exc)
            break
        except ValueError as exc:
            truncated, error = True, f"{url}: not an S3 listing ({exc})"
            break
        except (Unreachable, RetryLater):
            if first:
                raise  # the source could not be asked at all
            truncated, error = True, "the source stopped answering mid-listing"
            break
        except FetchError as exc:
            truncated, error = True, str(exc)
            break
        first = False
        keys.update(page.keys)
        if not page.is_truncated:
            break
        if page.next_token is None:  # ListObjectsV2 always sends one; never loop on the same page
            truncated, error = True, f"{url}: truncated listing without a NextContinuationToken"
            break
        token = page.next_token
    # Map keys back through the catalog's own paths rather than parsing file names.
    hours = tuple(h for h in expected if paths[h] in keys and paths[h] + ".idx" in keys)
    return _SourceResult(choice.source, hours, truncated, error)


def _check_by_probing(
    client: HttpClient,
    model: Model,
    run_time: datetime,
    choice: SourceChoice,
    expected: tuple[int, ...],
    budget: _Budget,
    known_hours: Collection[int],
) -> _SourceResult:
    """HEAD each hour's `.idx` in order until one is missing or the budget is spent."""
    start = 0
    while start < len(expected) and expected[start] in known_hours:
        start += 1
    found = list(expected[:start])
    answered = False
    for hour in expected[start:]:
        if not budget.take():
            return _SourceResult(choice.source, tuple(found), truncated=True)
        try:
            present = client.exists(choice.url(model, run_time, hour) + ".idx")
        except (Unreachable, RetryLater):
            if not answered:
                raise  # the source could not be asked at all
            return _SourceResult(choice.source, tuple(found), truncated=True, error="the source stopped answering")
        except FetchError as exc:
            return _SourceResult(choice.source, tuple(found), truncated=True, error=str(exc))
        answered = True
        if not present:
            break  # hours are published in order: nothing later exists yet
        found.append(hour)
    return _SourceResult(choice.source, tuple(found))


def _listing_url(base_url: str, prefix: str, token: str | None, page_size: int | None) -> str:
    params = {"list-type": "2", "prefix": prefix}
    if page_size is not None:
        params["max-keys"] = str(page_size)
    if token is not None:
        params["continuation-token"] = token
    # Keep "/" readable in the prefix; everything else (a token's "+" and "=") is escaped.
    return f"{base_url}/?{urlencode(params, quote_via=quote, safe='/')}"


def _local(tag: str) -> str:
    """`{namespace}Name` -> `Name`: S3 answers are namespaced, other servers' may not be."""
    return tag.rpartition("}")[2]


# ------------------------------------------------------------------------------------------
# The availability file
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceHealth:
    """Whether a source answered ScanSource lately; `since` is when that last changed."""

    source: str
    reachable: bool
    checked_at: str
    since: str
    error: str | None = None
    last_reachable_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"reachable": self.reachable, "checked_at": self.checked_at, "since": self.since,
                "error": self.error, "last_reachable_at": self.last_reachable_at}

    @classmethod
    def from_json(cls, source: str, data: Mapping[str, Any]) -> "SourceHealth":
        return cls(source, bool(data["reachable"]), str(data["checked_at"]), str(data.get("since") or data["checked_at"]),
                   data.get("error"), data.get("last_reachable_at"))


def _read_doc(cache: CacheLayout, name: str) -> dict[str, Any] | None:
    path = cache.source_availability_path(name)
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        log.warning("ignoring unreadable source availability file %s: %r", path, exc)
        return None


def load_availability(cache: CacheLayout, model: Model | str) -> dict[str, RunAvailability]:
    """What the last scans saw of each run of a model, by run key, newest first.

    A missing file is an empty answer; so is an unreadable one (logged; the next save
    rewrites it), so that status readers and the sensor never fail on it.
    """
    name = model if isinstance(model, str) else model.name
    doc = _read_doc(cache, name)
    if doc is None:
        return {}
    try:
        runs = {run: RunAvailability.from_json(entry) for run, entry in doc["runs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable source availability of %s: %r", name, exc)
        return {}
    return dict(sorted(runs.items(), reverse=True))


def load_source_health(cache: CacheLayout, model: Model | str) -> dict[str, SourceHealth]:
    """Each source's reachability as ScanSource last saw it, for one model."""
    name = model if isinstance(model, str) else model.name
    doc = _read_doc(cache, name) or {}
    out = {}
    for source, entry in (doc.get("sources") or {}).items():
        try:
            out[source] = SourceHealth.from_json(source, entry)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def source_health_after(old: Mapping[str, SourceHealth], items: Iterable[RunAvailability],
                        now: datetime) -> dict[str, SourceHealth]:
    """Each source's reachability after a scan: unreachable if any check this scan could not
    reach it, reachable if one got an answer from it; unchanged if it was not asked."""
    stamp = format_checked_at(now)
    seen: dict[str, tuple[bool, str | None]] = {}
    for item in items:
        for source in item.unreachable:
            seen[source] = (False, item.error)
        if item.source is not None and item.answered:
            seen.setdefault(item.source, (True, None))
    out = dict(old)
    for source, (reachable, error) in seen.items():
        before = old.get(source)
        since = before.since if before is not None and before.reachable == reachable else stamp
        last_ok = stamp if reachable else (before.last_reachable_at if before else None)
        out[source] = SourceHealth(source, reachable, stamp, since, None if reachable else error, last_ok)
    return out


def save_availability(
    cache: CacheLayout,
    availabilities: Iterable[RunAvailability],
    *,
    now: datetime | None = None,
    catalog: Catalog | None = None,
) -> dict[str, dict[str, RunAvailability]]:
    """Merge scan results into each model's availability file; returns the merged contents.

    A result replaces what is stored for its run, except that an older check never replaces
    a newer one, and a failed check (`error` set) that saw fewer hours never replaces a
    better one: a source outage must not erase what an earlier tick learned (an unreachable
    source's empty answer never replaces anything).  Each source's reachability is updated
    (`sources`).  Runs not younger than the model's `retention_hours` (at `now`) are dropped.
    Each file is written atomically; one writer per model (the sensor) is assumed.
    """
    catalog = catalog or load_catalog()
    now = _aware_utc(now or datetime.now(timezone.utc))
    by_model: dict[str, list[RunAvailability]] = {}
    for availability in availabilities:
        by_model.setdefault(availability.model, []).append(availability)

    merged_all: dict[str, dict[str, RunAvailability]] = {}
    for name, items in by_model.items():
        model = catalog.model(name)
        merged = load_availability(cache, name)
        for new in items:
            old = merged.get(new.run)
            if old is None or _replaces(new, old):
                merged[new.run] = new
        cutoff = now - timedelta(hours=model.retention_hours)
        kept = {run: a for run, a in sorted(merged.items(), reverse=True) if parse_run_key(run) > cutoff}
        health = source_health_after(load_source_health(cache, name), items, now)
        doc = {
            "format": AVAILABILITY_FORMAT,
            "model": name,
            "updated_at": format_checked_at(now),
            "retention_hours": model.retention_hours,
            "sources": {source: h.as_json() for source, h in sorted(health.items())},
            "runs": {run: a.as_json() for run, a in kept.items()},
        }
        atomic_write_text(cache.source_availability_path(name), json.dumps(doc, indent=1) + "\n")
        merged_all[name] = kept
    return merged_all


def _replaces(new: RunAvailability, old: RunAvailability) -> bool:
    # checked_at strings share one fixed format, so they compare in time order.
    if new.checked_at < old.checked_at:
        return False
    if not new.answered:
        return False  # no source could be asked: what we knew still stands
    if new.error and len(new.hours) < len(old.hours):
        return False
    return True


# ------------------------------------------------------------------------------------------
# Batching hours into runs
# ------------------------------------------------------------------------------------------


#: how long a run past its publish window is not asked again after a check that found it
#: incomplete (the source is not expected to change it, but a late file is still found)
SETTLED_RECHECK_S = 600


def settled_availability(model: Model, runs: Sequence[str], saved: Mapping[str, RunAvailability],
                         now: datetime) -> dict[str, RunAvailability]:
    """The runs of `runs` whose saved availability still stands, so a tick need not ask the source:
    a run complete at the source (nothing there can change), or one past its publish window whose
    last answer came after that window closed, less than SETTLED_RECHECK_S ago. Every other run
    (still publishing, never asked, or asked while unreachable) is listed again; so a tick costs
    about one request per run that can still change."""
    now = _aware_utc(now)
    settled = {}
    for run in runs:
        old = saved.get(run)
        if old is None or not old.answered or old.source is None or old.truncated or old.error:
            continue
        if old.complete:
            settled[run] = old
            continue
        closed = parse_run_key(run) + timedelta(hours=model.publish_window_hours)
        checked = _parse_checked_at(old.checked_at)
        if checked is not None and checked >= closed and now - checked < timedelta(seconds=SETTLED_RECHECK_S):
            settled[run] = old
    return settled


def _parse_checked_at(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def contiguous_batches(hours: Sequence[int], model: Model) -> list[list[int]]:
    """Split hours into runs of neighbours in the model's hour sequence (`model.all_hours`).

    GFS 119, 120, 123 form one batch because 121 and 122 do not exist; 119, 123 do not
    (120 is missing).  Duplicates are dropped; an hour the model never has is InvalidRequest.
    Each batch becomes one Dagster run (a single-run backfill over a partition range).
    """
    position = {h: i for i, h in enumerate(model.all_hours)}
    unknown = sorted({h for h in hours if h not in position})
    if unknown:
        raise InvalidRequest(f"{model.name} has no forecast hour(s) {unknown}")
    batches: list[list[int]] = []
    previous: int | None = None
    for hour in sorted(set(hours), key=position.__getitem__):
        if previous is not None and position[hour] == position[previous] + 1:
            batches[-1].append(hour)
        else:
            batches.append([hour])
        previous = hour
    return batches


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _resolve_model(model: Model | str, catalog: Catalog | None) -> Model:
    if isinstance(model, Model):
        return model
    return (catalog or load_catalog()).model(model)


def _aware_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware time, got naive {moment.isoformat()}")
    return moment.astimezone(timezone.utc)
