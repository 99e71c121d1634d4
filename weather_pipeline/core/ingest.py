"""IngestGrib: fetch one forecast hour's variables as GRIB2 subsets into the cache.

For each variable the `.idx` says which messages to fetch; messages that sit next to each
other (for any variable) are fetched in one Range request. The `.idx` is only a pointer: before
anything is written, every fetched message is checked whole from its headers (framing, the
GRIB2 section chain, eccodes' own total length) and its header must say it is the field, run
and forecast hour asked for (`check_identity`). Then all variable files of the hour are
committed together, so the cache never holds a partial or mislabelled hour.

Values are not decoded here: they are decoded once, where the tile is built, and the
plausible-value envelope that catches damage inside a data section (GRIB2 has no checksum) is
checked there on the array already decoded (`tiles._check_plausible`); a message that fails it
is quarantined and its hour fetched again, never tiled. Decoding here as well cost half of the
ingest's time (docs/benchmarks.md). When a source has the GRIB but no `.idx`,
the whole file is downloaded once and indexed locally with eccodes (and checked the same way).

Failures say what they are: HourNotPublished (no source has it), SourceUnreachable (a source
could not be reached at all: not "not published"), MessageMismatch (a message is not what its
`.idx` line says), SourceInconsistent (the `.idx` is there, the GRIB is not), CacheWriteError
(the disk). `is_transient` tells the orchestration which are worth another attempt.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

from weather_pipeline.core import grib
from weather_pipeline.core.cache import (
    CacheLayout,
    CacheWriteError,
    commit_files,
    hour_lock,
    md5_bytes,
    md5_file,
    sweep_dead_temps,
)
from weather_pipeline.core.catalog import Catalog, Model, Variable, load_catalog
from weather_pipeline.core.http import (
    FetchStats,
    HttpClient,
    NotFound,
    RetryLater,
    TransientError,
    Unreachable,
)
from weather_pipeline.core.idx import ByteRange, IdxEntry, IdxError, find_one, parse_idx, ranges_for
from weather_pipeline.core.sources import SourceChoice, SourceSettings, candidate_sources

log = logging.getLogger(__name__)

#: The largest GRIB2 message accepted (NOAA's biggest surface fields are a few MB); an `.idx`
#: claiming more is refused before any byte is fetched.
MAX_MESSAGE_BYTES = 64 << 20
#: The largest `.idx` accepted (GFS 0.25's has 743 lines, about 60 KB).
MAX_IDX_BYTES = 4 << 20


class IngestError(Exception):
    """An hour that could not be ingested; nothing was written for it. `transient`: worth a retry."""

    transient = False


class HourNotPublished(IngestError, LookupError):
    """No source has this forecast hour (yet); nothing was written."""


class SourceUnreachable(IngestError):
    """No source that may have the hour could be reached (refused, no DNS, timeout, circuit open)."""

    transient = True

    def __init__(self, message: str, servers: Sequence[str]):
        super().__init__(message)
        self.servers = tuple(servers)


class SourceInconsistent(IngestError):
    """The source has the `.idx` but not the GRIB it describes (or the reverse of a Range)."""

    transient = True


class MessageMismatch(IngestError):
    """A fetched message is not the field, run or hour its `.idx` line claims; never written."""


class SourceAsksToWait(IngestError):
    """The source answered with a Retry-After longer than we may wait; `until` says when."""

    def __init__(self, message: str, until: datetime):
        super().__init__(message)
        self.until = until


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: network trouble and 5xx yes; mismatches, a full disk,
    a bad request, an unpublished hour no."""
    if isinstance(exc, IngestError):
        return exc.transient
    if isinstance(exc, CacheWriteError):
        return False
    return isinstance(exc, TransientError)


@dataclass
class VariableResult:
    variable: str
    path: str
    md5: str
    bytes: int
    messages: list[str]  # inventory message numbers, e.g. ["71"]
    description: str  # "TMP:2 m above ground:5 hour fcst"


@dataclass
class IngestReport:
    model: str
    run: str
    hour: int
    source: str
    url: str
    index: str  # "remote .idx" or "built locally (no .idx on the source)"
    variables: list[VariableResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # variable -> why (e.g. not at f000)
    requests: int = 0  # every HTTP request, .idx and retries included
    grib_requests: int = 0  # Range requests for message bytes (first attempts)
    message_groups: int = 0  # contiguous groups of wanted messages
    bytes_fetched: int = 0  # every byte received, retries and .idx included
    index_bytes: int = 0  # size of the .idx (0 when built locally)
    message_bytes: int = 0  # bytes of the wanted messages themselves
    file_bytes: int | None = None  # size of the whole source file, when known
    retries: int = 0
    duration_s: float = 0.0
    sources_failed: dict[str, str] = field(default_factory=dict)  # source -> why it was passed over


def _plan(model: Model, variables: Sequence[Variable], entries: list[IdxEntry], hour: int, source: str):
    wanted: dict[str, list[IdxEntry]] = {}
    skipped: dict[str, str] = {}
    for var in variables:
        if not var.present_at(hour):
            skipped[var.name] = f"{model.name} publishes {var.name} from hour {var.first_hour}"
            continue
        wanted[var.name] = find_one(entries, var.pattern, source=source)
    return wanted, skipped


def _slice(body: bytes, group: ByteRange, entry: IdxEntry) -> bytes:
    lo = entry.start - group.start
    hi = len(body) if entry.end is None else entry.end - group.start + 1
    return body[lo:hi]


def check_identity(var: Variable, identity: grib.MessageIdentity, run_time: datetime, hour: int) -> list[str]:
    """Why `identity` (a message's own header) is not `var` at `run_time` + `hour`; [] if it is.

    The catalog's pattern is matched against the line wgrib2 would write for the header
    (parameter, level, forecast text); the reference time must be the run; the forecast time
    (the end of the interval, for a statistic) must be the hour; an accumulation must be the
    one the catalog names (`run_total`: from hour 0; `Nh`: the N hours ending at the hour).
    """
    problems = []
    line = identity.idx_line()
    if not var.pattern.search(line):
        problems.append(f"its parameter, level and forecast ({identity.inventory}) do not match {var.search!r}")
    if identity.reference_time != run_time:
        problems.append(f"its reference time is {identity.reference_time:%Y-%m-%d %H:%M}Z, not the run "
                        f"{run_time:%Y-%m-%d %H:%M}Z")
    if identity.end_hour != hour:
        problems.append(f"its forecast time is hour {_h(identity.end_hour)}, not hour {hour}")
    if var.accumulation:
        if identity.statistic != 1:
            problems.append("it is not an accumulation (code table 4.10 process 1)")
        else:
            start = 0 if var.accumulation == "run_total" else max(0, hour - int(var.accumulation.rstrip("h")))
            if identity.start_hour != start:
                problems.append(f"it accumulates from hour {_h(identity.start_hour)}, not from hour {start} "
                                f"({var.accumulation})")
    return problems


def _h(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _verify_group(data: bytes, group: ByteRange, variable_at: dict[int, Variable], source: str) -> None:
    """Every wanted message in a fetched range, from its headers: framed where the `.idx` says,
    and its GRIB2 sections chained to its `7777` (a failure here is retried as a bad transfer)."""
    spans = grib.iter_message_spans(data, source=source)
    wanted = {start - group.start for start in variable_at if _starts_in(start, group)}
    if {s.offset for s in spans} != wanted:
        raise grib.GribError(f"{source}: messages at offsets {sorted(s.offset for s in spans)}, expected {sorted(wanted)}")
    for span in spans:
        var = variable_at[group.start + span.offset]
        if span.edition != 2:
            raise grib.GribError(f"{source} ({var.name}): the message at byte {span.offset} is GRIB{span.edition}, not GRIB2")
        grib.grib2_sections(memoryview(data)[span.offset : span.end], source=f"{source} ({var.name})", offset=span.offset)


def _starts_in(start: int, group: ByteRange) -> bool:
    return start >= group.start and (group.end is None or start <= group.end)


def _in_group(entry: IdxEntry, group: ByteRange) -> bool:
    return _starts_in(entry.start, group)


def ingest_hour(
    model_name: str,
    run: str,
    hour: int,
    *,
    cache: CacheLayout,
    client: HttpClient,
    settings: SourceSettings,
    variables: Sequence[str] | None = None,
    allow_full_download: bool = True,
    catalog: Catalog | None = None,
    now: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> IngestReport:
    """Fetch one forecast hour of one model run into the cache; see the module docstring.

    Sources are tried best first; one that does not have the hour (404/403), cannot be reached,
    or serves an `.idx` without its GRIB is passed over for the next. While another process
    writes the same hour, this one waits for it and then reuses what it wrote.
    """
    t0 = time.monotonic()
    started = time.time()
    catalog = catalog or load_catalog()
    model = catalog.model(model_name)
    run_time = model.validate_run(run)
    model.validate_hour(run, hour)
    selected = model.select_variables(list(variables) if variables else None)
    say = progress or (lambda msg: None)
    with client.metered() as meter:  # this hour's requests, while other hours share the client
        return _ingest_hour(model, run, run_time, hour, selected, cache, client, settings, allow_full_download,
                            catalog, now, say, meter, t0, started)


def _ingest_hour(model: Model, run: str, run_time: datetime, hour: int, selected: Sequence[Variable],
                 cache: CacheLayout, client: HttpClient, settings: SourceSettings, allow_full_download: bool,
                 catalog: Catalog, now: datetime | None, say: Callable[[str], None], meter: FetchStats,
                 t0: float, started: float) -> IngestReport:
    def finish(report: IngestReport) -> IngestReport:
        report.requests, report.bytes_fetched, report.retries = meter.requests, meter.bytes, meter.retries
        report.duration_s = round(time.monotonic() - t0, 3)
        return report

    with hour_lock(cache, "gribs", model.name, run, hour,
                   on_wait=lambda: say(f"{model.name} {run} f{hour:03d}: another run is writing this hour; waiting")) as waited:
        if waited:
            reused = _written_meanwhile(model, run, hour, selected, cache, started)
            if reused is not None:
                return finish(reused)
        swept = sweep_dead_temps(cache.grib_path(model.name, run, v.name, hour) for v in selected)
        if swept:
            log.warning("%s %s f%03d: removed %d temporary files left by a dead writer", model.name, run, hour, len(swept))
        failed: dict[str, tuple[str, str]] = {}  # source -> (kind, why)
        unreachable: list[str] = []
        wait_orders: list[RetryLater] = []
        for choice in candidate_sources(model, run_time, settings, catalog=catalog, now=now):
            url = choice.url(model, run_time, hour)
            try:
                report = _ingest_from(model, run, run_time, hour, url, choice, selected, cache, client,
                                      allow_full_download, say)
            except NotFound as exc:
                failed[choice.source] = ("not_found", f"{exc.url}: not found")
            except Unreachable as exc:
                failed[choice.source] = ("unreachable", exc.reason)
                unreachable.append(exc.server)
                say(f"{model.name} {run} f{hour:03d}: {choice.source} unreachable ({exc.reason}); next source")
            except SourceInconsistent as exc:
                failed[choice.source] = ("inconsistent", str(exc))
            except RetryLater as exc:
                failed[choice.source] = ("wait", exc.reason)
                wait_orders.append(exc)
            else:
                report.sources_failed = {name: why for name, (_kind, why) in failed.items()}
                return finish(report)
    kinds = {kind for kind, _why in failed.values()}
    tried = "; ".join(f"{name}: {why}" for name, (_kind, why) in failed.items())
    what = f"{model.name} run {run} hour {hour}"
    if kinds == {"wait"}:
        until = min(w.until for w in wait_orders)
        raise SourceAsksToWait(f"{what}: the source asks to wait until {until:%Y-%m-%d %H:%M:%S}Z ({tried})", until)
    if "unreachable" in kinds:
        # a source we could not ask may have the hour: never call that "not published"
        raise SourceUnreachable(f"{what}: {len(unreachable)} source(s) unreachable ({tried})", unreachable)
    if "inconsistent" in kinds:
        raise SourceInconsistent(f"{what}: {tried}")
    raise HourNotPublished(f"{what} is not published on any source: {tried}")


#: hours of a batch fetched at once; their requests share the client's per-server bound
HOURS_AT_ONCE = 4


class HourBatch:
    """Hours of one model ingested concurrently (`ingest_hours`); iterate for (run, hour, report
    or the exception) as each ends. `cancel_pending()` (a full disk: every later hour would fail
    too) drops the hours not started; those in flight still end and are still yielded, so no
    committed hour goes unreported. Use it as a context manager: leaving waits for every thread."""

    def __init__(self, model_name: str, hours: Sequence[tuple[str, int]], hours_at_once: int,
                 client: HttpClient, kwargs: dict):
        self._client = client
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(hours_at_once, len(hours))),
                                        thread_name_prefix="hours")
        self._futures = {self._pool.submit(ingest_hour, model_name, run, hour, client=client, **kwargs): (run, hour)
                         for run, hour in hours}
        self.cancelled: list[tuple[str, int]] = []

    def __iter__(self) -> Iterator[tuple[str, int, IngestReport | BaseException]]:
        for future in as_completed(self._futures):
            if future.cancelled():
                continue
            run, hour = self._futures[future]
            exc = future.exception()
            yield run, hour, exc if exc is not None else future.result()

    def cancel_pending(self) -> list[tuple[str, int]]:
        self.cancelled += [rh for f, rh in self._futures.items() if f.cancel()]
        return self.cancelled

    def __enter__(self) -> "HourBatch":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # interrupted, or the caller failed: in-flight downloads stop now
            self._client.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)


def ingest_hours(model_name: str, hours: Sequence[tuple[str, int]], *, hours_at_once: int = HOURS_AT_ONCE,
                 client: HttpClient, **kwargs) -> HourBatch:
    """Ingest (run, hour) pairs of one model, `hours_at_once` at a time; see `HourBatch`. The
    keyword arguments are `ingest_hour`'s."""
    return HourBatch(model_name, hours, hours_at_once, client, kwargs)


def _written_meanwhile(model: Model, run: str, hour: int, selected: Sequence[Variable], cache: CacheLayout,
                       since: float) -> IngestReport | None:
    """The hour as another writer just left it, if it wrote every wanted variable after `since`."""
    results = []
    for var in selected:
        if not var.present_at(hour):
            continue
        path = cache.grib_path(model.name, run, var.name, hour)
        try:
            if path.stat().st_mtime < since - 1:
                return None
        except FileNotFoundError:
            return None
        data = path.read_bytes()
        results.append(VariableResult(var.name, str(path), md5_bytes(data), len(data), [], "written by a concurrent run"))
    return IngestReport(model=model.name, run=run, hour=hour, source="cache", url="", index="written meanwhile by "
                        "another run of the same partition (its checks passed)", variables=results,
                        message_bytes=sum(r.bytes for r in results))


def _full_file_index(model: Model, run: str, hour: int, url: str, choice: SourceChoice, cache: CacheLayout,
                     client: HttpClient, say: Callable[[str], None]) -> tuple[str, bytes]:
    say(f"{model.name} {run} f{hour:03d}: no .idx on {choice.source}; downloading the whole file")
    scratch = cache.scratch_file(".grib2")
    try:
        client.download(url, scratch)
        whole = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    return grib.build_index(whole, source=url), whole


def _ingest_from(
    model: Model,
    run: str,
    run_time: datetime,
    hour: int,
    url: str,
    choice: SourceChoice,
    selected: Sequence[Variable],
    cache: CacheLayout,
    client: HttpClient,
    allow_full_download: bool,
    say: Callable[[str], None],
) -> IngestReport:
    idx_url = url + ".idx"
    try:
        idx_text = client.get_text(idx_url, max_bytes=MAX_IDX_BYTES)
        whole: bytes | None = None
        index_kind = "remote .idx"
    except NotFound:
        # No inventory: if the GRIB itself is there, take it whole and index it ourselves.
        if not allow_full_download or not client.exists(url):
            raise
        idx_text, whole = _full_file_index(model, run, hour, url, choice, cache, client, say)
        index_kind = "built locally (no .idx on the source)"

    entries = parse_idx(idx_text, source=idx_url, file_size=len(whole) if whole is not None else None)
    wanted, skipped = _plan(model, selected, entries, hour, idx_url)
    all_entries = [e for es in wanted.values() for e in es]
    for e in all_entries:
        if e.length is not None and e.length > MAX_MESSAGE_BYTES:
            raise IdxError(f"{idx_url}: message {e.msg} ({e.description}) would be {e.length} bytes, over the "
                           f"{MAX_MESSAGE_BYTES} byte limit per message; the inventory is not trustworthy")
    groups = ranges_for(all_entries)
    report = IngestReport(
        model=model.name, run=run, hour=hour, source=choice.source, url=url, index=index_kind,
        skipped=skipped, message_groups=len(groups), file_bytes=len(whole) if whole is not None else None,
        index_bytes=0 if whole is not None else len(idx_text.encode()),
    )

    # Fetch each contiguous group once (concurrently, bounded per server by the client); check
    # every message in it from its headers before keeping it.
    variable_at = {e.start: model.variable(name) for name, es in wanted.items() for e in es}

    def fetch(group: ByteRange) -> bytes:
        def check(data: bytes) -> None:
            _verify_group(data, group, variable_at, f"{url} [{group.header}]")

        if whole is not None:
            end = len(whole) if group.end is None else group.end + 1
            body = whole[group.start:end]
            check(body)
            return body
        cap = MAX_MESSAGE_BYTES * sum(1 for e in all_entries if _in_group(e, group))
        try:
            return client.get_bytes(url, group, validate=check, max_bytes=cap)
        except NotFound as exc:
            raise SourceInconsistent(f"{choice.source}: the .idx is there but the GRIB is not ({exc.reason}); "
                                     "the source is mid-publication or inconsistent") from None

    bodies = dict(zip(groups, _each(fetch, groups, client)))
    report.grib_requests = 0 if whole is not None else len(groups)

    # Identity, then one commit of every variable file of the hour.
    files: list[tuple[Path, bytes]] = []
    for var_name, var_entries in wanted.items():
        var = model.variable(var_name)
        parts = []
        for entry in var_entries:
            group = next(g for g in groups if _in_group(entry, g))
            part = _slice(bodies[group], group, entry)
            where = f"{url} bytes {entry.start}-{'' if entry.end is None else entry.end}"
            # Keep exactly the framed messages: a stray byte NOAA left after one is not ours.
            spans = grib.iter_message_spans(part, source=where)
            for span in spans:
                message = part[span.offset : span.offset + span.length]
                for identity in grib.message_identities(message, source=where):
                    problems = check_identity(var, identity, run_time, hour)
                    if problems:
                        raise MessageMismatch(
                            f"{where}: the {'.idx' if whole is None else 'local index'} says message {entry.msg} is "
                            f"{entry.description} (d={entry.date}) but the message itself is {identity}: it is not "
                            f"{model.name} {var.name} ({var.search}) of run {run} hour {hour}, because "
                            + "; ".join(problems) + f". Nothing was written for {model.name} {run} f{hour:03d}."
                        )
                parts.append(message)
        data = b"".join(parts)
        path = cache.grib_path(model.name, run, var_name, hour)
        files.append((path, data))
        report.message_bytes += len(data)
        report.variables.append(
            VariableResult(
                variable=var_name, path=str(path), md5=md5_bytes(data), bytes=len(data),
                messages=[e.msg for e in var_entries], description=var_entries[0].description,
            )
        )
    commit_files(files)
    say(f"{model.name} {run} f{hour:03d}: {len(report.variables)} variables from {choice.source}")
    return report


def _each(fn: Callable[[ByteRange], bytes], groups: Sequence[ByteRange], client: HttpClient) -> list[bytes]:
    """`fn` over the groups, in threads that count in the caller's meter; the first failure (in
    group order) is raised once every started request has ended, so nothing runs on behind it."""
    if len(groups) < 2:
        return [fn(g) for g in groups]
    meter = client.current_meter()

    def run(group: ByteRange) -> bytes:
        with client.metered(meter):
            return fn(group)

    with ThreadPoolExecutor(max_workers=min(len(groups), client.config.max_connections_per_host),
                            thread_name_prefix="ranges") as pool:
        futures = [pool.submit(run, g) for g in groups]
        try:
            wait(futures)
        except BaseException:  # an interrupt (SIGTERM, Ctrl-C): the helpers stop at their next chunk
            client.abort()
            raise
    return [f.result() for f in futures]


def verify_hour_files(model: Model, run: str, hour: int, cache: CacheLayout,
                      recorded_md5: dict[str, str]) -> dict[str, str]:
    """Files of a materialized hour that are missing or differ from their recorded md5: var -> why."""
    damaged = {}
    for var, md5 in recorded_md5.items():
        path = cache.grib_path(model.name, run, var, hour)
        try:
            actual = md5_file(path)
        except FileNotFoundError:
            damaged[var] = f"{path}: missing"
            continue
        if actual != md5:
            damaged[var] = f"{path}: md5 {actual}, recorded {md5}"
    return damaged
