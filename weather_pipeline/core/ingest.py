"""IngestGrib: fetch one forecast hour's variables as GRIB2 subsets into the cache.

For each variable the `.idx` says which messages to fetch; messages that sit next to each
other (for any variable) are fetched in one Range request. Every message is checked whole
(framing and an eccodes decode) before anything is written, and each variable's file is
written atomically, so the cache never holds a partial subset. When a source has the GRIB
but no `.idx`, the whole file is downloaded once and indexed locally with eccodes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Sequence

from weather_pipeline.core import grib
from weather_pipeline.core.cache import CacheLayout, atomic_write_bytes, md5_bytes
from weather_pipeline.core.catalog import Catalog, Model, Variable, load_catalog
from weather_pipeline.core.http import HttpClient, NotFound
from weather_pipeline.core.idx import ByteRange, IdxEntry, find_one, parse_idx, ranges_for
from weather_pipeline.core.sources import SourceChoice, SourceSettings, candidate_sources

log = logging.getLogger(__name__)


class HourNotPublished(LookupError):
    """No source has this forecast hour (yet); nothing was written."""


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


#: How far outside a variable's physical range decoded values may go before the message is
#: called corrupt. GRIB2 has no checksum and eccodes decodes damaged data sections happily, but
#: with NOAA's spatial-differencing packing damage is integrated into every later value, which
#: lands orders of magnitude outside; a generous envelope never rejects a real fill value.
CORRUPTION_ENVELOPE = 10.0


def plausible_envelope(var: Variable) -> tuple[float, float] | None:
    if var.valid_range is None:
        return None
    low, high = var.valid_range
    span = high - low
    return (low - CORRUPTION_ENVELOPE * span, high + CORRUPTION_ENVELOPE * span)


def _verify_group(data: bytes, group: ByteRange, variable_at: dict[int, Variable], source: str) -> None:
    """Every wanted message in a fetched range: framed, decodable, values plausible."""
    spans = grib.iter_message_spans(data, source=source)
    wanted = {start - group.start for start in variable_at if _starts_in(start, group)}
    if {s.offset for s in spans} != wanted:
        raise grib.GribError(f"{source}: messages at offsets {sorted(s.offset for s in spans)}, expected {sorted(wanted)}")
    for span in spans:
        var = variable_at[group.start + span.offset]
        grib.verify_messages(data[span.offset : span.end], source=f"{source} ({var.name})", expected=1,
                             valid_range=plausible_envelope(var))


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
    """Fetch one forecast hour of one model run into the cache; see the module docstring."""
    t0 = time.monotonic()
    catalog = catalog or load_catalog()
    model = catalog.model(model_name)
    run_time = model.validate_run(run)
    model.validate_hour(run, hour)
    selected = model.select_variables(list(variables) if variables else None)
    stats_before = (client.stats.requests, client.stats.bytes, client.stats.retries)
    say = progress or (lambda msg: None)

    tried: list[str] = []
    for choice in candidate_sources(model, run_time, settings, catalog=catalog, now=now):
        url = choice.url(model, run_time, hour)
        try:
            report = _ingest_from(model, run, hour, url, choice, selected, cache, client, allow_full_download, say)
        except NotFound as exc:
            tried.append(f"{choice.source} ({exc.url}: not found)")
            continue
        report.requests = client.stats.requests - stats_before[0]
        report.bytes_fetched = client.stats.bytes - stats_before[1]
        report.retries = client.stats.retries - stats_before[2]
        report.duration_s = round(time.monotonic() - t0, 3)
        return report
    raise HourNotPublished(f"{model.name} run {run} hour {hour} is not published on any source: {'; '.join(tried)}")


def _ingest_from(
    model: Model,
    run: str,
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
        idx_text = client.get_text(idx_url)
        whole: bytes | None = None
        index_kind = "remote .idx"
    except NotFound:
        # No inventory: if the GRIB itself is there, take it whole and index it ourselves.
        if not allow_full_download:
            raise
        if not client.exists(url):
            raise
        say(f"{model.name} {run} f{hour:03d}: no .idx on {choice.source}; downloading the whole file")
        scratch = cache.scratch_file(".grib2")
        try:
            client.download(url, scratch)
            whole = scratch.read_bytes()
        finally:
            scratch.unlink(missing_ok=True)
        idx_text = grib.build_index(whole)
        index_kind = "built locally (no .idx on the source)"

    entries = parse_idx(idx_text, source=idx_url, file_size=len(whole) if whole is not None else None)
    wanted, skipped = _plan(model, selected, entries, hour, idx_url)
    all_entries = [e for es in wanted.values() for e in es]
    groups = ranges_for(all_entries)
    report = IngestReport(
        model=model.name, run=run, hour=hour, source=choice.source, url=url, index=index_kind,
        skipped=skipped, message_groups=len(groups), file_bytes=len(whole) if whole is not None else None,
        index_bytes=0 if whole is not None else len(idx_text.encode()),
    )

    # Fetch each contiguous group once; verify every message in it before keeping it.
    variable_at = {e.start: model.variable(name) for name, es in wanted.items() for e in es}
    bodies: dict[ByteRange, bytes] = {}
    for group in groups:
        check = lambda data, g=group: _verify_group(data, g, variable_at, f"{url} [{g.header}]")  # noqa: E731
        if whole is not None:
            end = len(whole) if group.end is None else group.end + 1
            body = whole[group.start:end]
            check(body)
        else:
            body = client.get_bytes(url, group, validate=check)
            report.grib_requests += 1
        bodies[group] = body

    # Split into per-variable files; write each atomically.
    for var_name, var_entries in wanted.items():
        parts = []
        for entry in var_entries:
            group = next(g for g in groups if _in_group(entry, g))
            part = _slice(bodies[group], group, entry)
            # Keep exactly the framed messages: a stray byte NOAA left after one is not ours.
            parts += [part[s.offset : s.offset + s.length] for s in grib.iter_message_spans(part, source=url)]
        data = b"".join(parts)
        path = cache.grib_path(model.name, run, var_name, hour)
        atomic_write_bytes(path, data)
        report.message_bytes += len(data)
        report.variables.append(
            VariableResult(
                variable=var_name, path=str(path), md5=md5_bytes(data), bytes=len(data),
                messages=[e.msg for e in var_entries], description=var_entries[0].description,
            )
        )
    say(f"{model.name} {run} f{hour:03d}: {len(report.variables)} variables from {choice.source}")
    return report

