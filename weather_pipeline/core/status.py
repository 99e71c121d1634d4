"""Deep status: queue health, per-run completeness with reasons, disk use, alerts.

Pure computation over plain facts; `orchestration/status.py` gathers the facts from the Dagster
instance and the cache. The document extends DESIGN.md section 5 (fields are added, never
renamed); its JSON Schema is `weather_pipeline/status/deep_status.schema.json`.

Definitions:
- a *worker* is a run slot of the queue (`max_concurrent_runs`) served by a live daemon:
  `workers_configured` = slots; `workers_online` = slots when the daemon's heartbeat is fresh,
  else 0 (nothing would dequeue or launch runs);
- `failure_rate_1h` = runs failed / runs finished in the last hour;
- a model run is `complete` when every expected hour has its GRIB and its tiles; `in_progress`
  when work on it is queued or running; `failed` when its missing hours last failed; `partial`
  when some hours are in; `missing` when none are;
- a source is `reachable` when ScanSource's last request to it got an answer (any HTTP status);
  an unreachable one (refused, no DNS, timeout, circuit open) raises `source_unreachable`;
- `repairs` are the forecast hours whose cached files were found damaged (quarantined, being
  fetched or rebuilt again): `cache_damaged` names their files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from weather_pipeline.core.catalog import format_hours

SCHEMA_VERSION = 1
#: the daemon writes a heartbeat every 30 s; past this it is considered gone
HEARTBEAT_STALE_S = 120.0
#: free space on the cache's file system below which ingest and tiles will soon fail
DEFAULT_MIN_FREE_BYTES = 2 * 10**9


@dataclass(frozen=True)
class SourceFacts:
    """A source's reachability for one model, as ScanSource last saw it (core.scan.SourceHealth)."""

    model: str
    source: str
    reachable: bool
    checked_at: str
    since: str
    error: str | None = None
    last_reachable_at: str | None = None


@dataclass(frozen=True)
class RepairFacts:
    """An open repair ticket (core.repairs.RepairTicket)."""

    model: str
    run: str
    hour: int
    kind: str
    problem: str
    files: tuple[str, ...] = ()
    opened_at: str = ""


@dataclass(frozen=True)
class JobFacts:
    run_id: str
    job: str
    status: str  # DagsterRunStatus name
    tags: Mapping[str, str]
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None  # first line of the failure
    worker: str | None = None
    # what the run works on when its tags do not say (a `dagster asset materialize` or UI run)
    task: str | None = None
    model: str | None = None
    run: str | None = None
    retried_as: str | None = None  # the re-execution of this run, if one was launched


@dataclass(frozen=True)
class ModelRunFacts:
    model: str
    run: str
    run_time: datetime
    expected_hours: tuple[int, ...]
    grib_hours: frozenset[int]
    tile_hours: frozenset[int]
    source_hours: tuple[int, ...] | None  # None: the source was never checked for this run
    in_flight_hours: frozenset[int] = frozenset()
    failed: Mapping[int, str] = field(default_factory=dict)  # hour -> first line of the last failure
    tile_failed: Mapping[int, str] = field(default_factory=dict)
    unreachable: str | None = None  # every source of the model is unreachable: why
    damaged_hours: frozenset[int] = frozenset()  # hours with an open repair ticket


@dataclass(frozen=True)
class QueueFacts:
    pending: int
    active: int
    failed_1h: int
    finished_1h: int
    max_concurrent_runs: int
    daemon_heartbeat_age_s: float | None  # None: no heartbeat at all


@dataclass(frozen=True)
class ModelPolicy:
    """What "stale" means for a model: its run spacing and how long publishing takes."""

    name: str
    run_spacing_hours: int
    publish_window_hours: int


@dataclass(frozen=True)
class StatusInputs:
    now: datetime
    queue: QueueFacts
    model_runs: Sequence[ModelRunFacts]
    jobs: Sequence[JobFacts]
    disk_usage: Mapping[str, Any]  # core.prune.disk_usage()
    disk_budget_bytes: int | None
    policies: Sequence[ModelPolicy]
    dagster_url: str | None = None
    sources: Sequence[SourceFacts] = ()
    repairs: Sequence[RepairFacts] = ()
    disk_free_bytes: int | None = None
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    status_interval_s: float | None = None  # how often the writer rewrites the document


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _iso_text(value: Any) -> str | None:
    """An ISO timestamp string (or datetime) as `iso()` writes it, to the second, with Z."""
    if value is None:
        return None
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return iso(t)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _first_line(text: str | None) -> str | None:
    if not text:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:300] or None


def _hours_label(tags: Mapping[str, str]) -> str | None:
    start = tags.get("dagster/asset_partition_range_start")
    end = tags.get("dagster/asset_partition_range_end")
    if start and end:
        return f"{start.split('|')[0]}-{end.split('|')[0]}"
    single = tags.get("dagster/partition")
    return single.split("|")[0] if single else None


def inventory_entry(f: ModelRunFacts) -> dict[str, Any]:
    expected = set(f.expected_hours)
    have = f.grib_hours & expected
    tiles = f.tile_hours & expected
    missing = sorted(expected - have)
    tiles_missing = sorted(have - tiles)
    published = set(f.source_hours) if f.source_hours is not None else None
    if not missing and not tiles_missing:
        status = "complete"
    elif f.in_flight_hours & (set(missing) | set(tiles_missing)):
        status = "in_progress"
    elif any(h in f.failed for h in missing) or any(h in f.tile_failed for h in tiles_missing):
        status = "failed"
    elif have:
        status = "partial"
    else:
        status = "missing"
    reason = None
    failed_missing = [h for h in missing if h in f.failed]
    if failed_missing:
        reason = f"GRIB download failed: {f.failed[failed_missing[0]]}"
    elif any(h in f.tile_failed for h in tiles_missing):
        reason = f"tile build failed: {f.tile_failed[next(h for h in tiles_missing if h in f.tile_failed)]}"
    elif missing and f.unreachable and not (f.in_flight_hours & set(missing)):
        reason = f"source unreachable: {f.unreachable}"
    elif missing and published is not None and not (set(missing) & published):
        reason = "not yet published"
    elif missing and f.in_flight_hours & set(missing):
        reason = "download queued or running"
    elif missing and published is not None:
        reason = "published, not yet requested"
    elif missing:
        reason = "source not checked yet"
    elif tiles_missing:
        reason = "tile build queued or running" if f.in_flight_hours & set(tiles_missing) else "tile not built yet"
    damaged = sorted(f.damaged_hours & expected)
    if damaged and reason is None:
        reason = f"damaged in the cache, being repaired: hour(s) {format_hours(tuple(damaged))}"
    return {
        "model": f.model,
        "run": f.run,
        "status": status,
        "hours_expected": len(expected),
        "expected_hours": sorted(expected),
        "hours_have": len(have),
        "missing_hours": missing,
        "source_hours": len(published) if published is not None else None,
        "reason": reason,
        "tiles_missing_hours": tiles_missing,
        "tiles_have": len(tiles),
        "damaged_hours": damaged,
    }


def job_entry(j: JobFacts, now: datetime) -> dict[str, Any]:
    start = j.started_at
    end = j.ended_at or (now if start and j.status in ("STARTED", "STARTING", "CANCELING") else None)
    prio = j.tags.get("dagster/priority")
    return {
        "run_id": j.run_id,
        "job": j.job,
        "task": j.tags.get("task") or j.task,
        "model": j.tags.get("model") or j.model,
        "run": j.tags.get("run") or j.run,
        "hours": _hours_label(j.tags),
        "status": j.status,
        "created_at": iso(j.created_at),
        "started_at": iso(start),
        "ended_at": iso(j.ended_at),
        "duration_s": round((end - start).total_seconds(), 1) if start and end else None,
        "worker": j.worker,
        "error": _first_line(j.error),
        "priority": int(prio) if prio and prio.lstrip("-").isdigit() else None,
        "retried_as": j.retried_as,
    }


def _alerts(inputs: StatusInputs, queue: dict, inventory: list[dict]) -> list[dict[str, str]]:
    alerts: list[dict[str, str]] = []

    def add(level: str, code: str, message: str) -> None:
        alerts.append({"level": level, "code": code, "message": message})

    q = inputs.queue
    if q.daemon_heartbeat_age_s is None:
        add("critical", "daemon_down", "no Dagster daemon heartbeat: sensors, schedules and the queue are stopped")
    elif q.daemon_heartbeat_age_s > HEARTBEAT_STALE_S:
        add("critical", "daemon_heartbeat_stale",
            f"last Dagster daemon heartbeat {q.daemon_heartbeat_age_s:.0f} s ago (expected every 30 s)")
    rate = queue["failure_rate_1h"]
    if q.failed_1h and rate >= 0.5:
        add("critical", "failure_rate", f"{q.failed_1h} of {q.finished_1h} runs failed in the last hour ({rate:.0%})")
    elif q.failed_1h and rate >= 0.1:
        add("warning", "failure_rate", f"{q.failed_1h} of {q.finished_1h} runs failed in the last hour ({rate:.0%})")
    for policy in inputs.policies:
        runs = [e for e in inventory if e["model"] == policy.name]
        complete = [f.run_time for f in inputs.model_runs if f.model == policy.name
                    and next(e for e in runs if e["run"] == f.run)["status"] == "complete"]
        allowed = timedelta(hours=policy.run_spacing_hours + policy.publish_window_hours + 1)
        newest = max(complete) if complete else None
        if newest is None or inputs.now - newest > allowed:
            age = "none within retention" if newest is None else f"newest is {iso(newest)}"
            add("warning", "stale_data",
                f"{policy.name}: no complete run in the last {allowed.total_seconds() / 3600:.0f} h ({age})")
    by_model: dict[str, list[SourceFacts]] = {}
    for src in inputs.sources:
        by_model.setdefault(src.model, []).append(src)
    for model, sources in sorted(by_model.items()):
        down = [s for s in sources if not s.reachable]
        if not down:
            continue
        level = "critical" if len(down) == len(sources) else "warning"
        add(level, "source_unreachable",
            f"{model}: " + "; ".join(f"{s.source} unreachable since {s.since}"
                                     + (f" ({_clip(s.error, 160)})" if s.error else "") for s in down)
            + ("; no source left: nothing can be fetched" if level == "critical" else "; using the others"))
    if inputs.repairs:
        files = [f for r in inputs.repairs for f in r.files[:1]]
        add("warning", "cache_damaged",
            f"{len(inputs.repairs)} damaged hour(s) quarantined and being repaired: "
            + "; ".join(f"{r.model} {r.run} f{r.hour:03d} ({r.kind})" for r in inputs.repairs[:5])
            + (f"; files: {', '.join(files[:5])}" if files else ""))
    free = inputs.disk_free_bytes
    if free is not None and free < 2 * inputs.min_free_bytes:
        level = "critical" if free < inputs.min_free_bytes else "warning"
        add(level, "disk_low",
            f"{free / 1e9:.2f} GB free on the cache's file system (alert below {2 * inputs.min_free_bytes / 1e9:.2f} GB, "
            f"critical below {inputs.min_free_bytes / 1e9:.2f} GB): ingest and tiles fail when it is full")
    budget = inputs.disk_budget_bytes
    total = int(inputs.disk_usage.get("total_bytes", 0))
    if budget and total > 0.9 * budget:
        add("critical" if total > budget else "warning", "disk_budget",
            f"cache uses {total / 1e9:.2f} GB of its {budget / 1e9:.2f} GB budget ({total / budget:.0%})")
    for e in inventory:
        waiting = [h for h in e["tiles_missing_hours"]]
        if waiting and e["status"] != "in_progress":
            add("warning", "grib_without_tile",
                f"{e['model']} {e['run']}: GRIB present, tile missing for hour(s) {', '.join(map(str, waiting[:10]))}")
    return alerts


def health_of(alerts: Sequence[Mapping[str, str]]) -> str:
    levels = {a["level"] for a in alerts}
    return "unhealthy" if "critical" in levels else "degraded" if "warning" in levels else "healthy"


EXIT_CODES = {"healthy": 0, "degraded": 1, "unhealthy": 2}
#: a document older than this many of its writer's intervals is stale (three writes missed)
STALE_AFTER_INTERVALS = 3
#: ... and one that does not say its interval (written by an older version)
DEFAULT_STALE_AFTER_S = 600.0


def document_age_s(doc: Mapping[str, Any], now: datetime | None = None) -> float | None:
    """Seconds from the document's `generated_at` to `now`; None if it has no valid one."""
    from datetime import timezone

    value = doc.get("generated_at")
    if not isinstance(value, str):
        return None
    try:
        generated = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if generated.tzinfo is None:
        generated = generated.replace(tzinfo=timezone.utc)
    return ((now or datetime.now(timezone.utc)) - generated).total_seconds()


def stale_limit_s(doc: Mapping[str, Any], default: float = DEFAULT_STALE_AFTER_S) -> float:
    """When a document goes stale: 3 x its writer's interval, else `default`."""
    interval = doc.get("status_interval_s")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
        return STALE_AFTER_INTERVALS * float(interval)
    return default


def fresh_document(path) -> dict[str, Any] | None:
    """The document at `path` if it is readable and not stale, else None."""
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or "health" not in doc:
        return None
    age = document_age_s(doc)
    return doc if age is not None and age <= stale_limit_s(doc) else None


def compute_deep_status(inputs: StatusInputs) -> dict[str, Any]:
    q = inputs.queue
    alive = q.daemon_heartbeat_age_s is not None and q.daemon_heartbeat_age_s <= HEARTBEAT_STALE_S
    queue = {
        "pending": q.pending,
        "active": q.active,
        "failed_1h": q.failed_1h,
        "finished_1h": q.finished_1h,
        "failure_rate_1h": round(q.failed_1h / q.finished_1h, 3) if q.finished_1h else 0.0,
        "workers_online": q.max_concurrent_runs if alive else 0,
        "workers_configured": q.max_concurrent_runs,
        "daemon_alive": alive,
        "daemon_heartbeat_age_s": None if q.daemon_heartbeat_age_s is None else round(q.daemon_heartbeat_age_s, 1),
    }
    inventory = [inventory_entry(f) for f in sorted(inputs.model_runs, key=lambda f: (f.model, f.run), reverse=True)]
    usage = inputs.disk_usage
    resources = {
        "disk_bytes": usage.get("by_run", {}),
        "disk_total_bytes": int(usage.get("total_bytes", 0)),
        "disk_budget_bytes": inputs.disk_budget_bytes,
        "cache_oldest": _iso_text(usage.get("cache_oldest")),
        "cache_newest": _iso_text(usage.get("cache_newest")),
        "disk_scanned_at": _iso_text(usage.get("scanned_at")),
        "disk_free_bytes": inputs.disk_free_bytes,
    }
    alerts = _alerts(inputs, queue, inventory)
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": iso(inputs.now),
        "status_interval_s": inputs.status_interval_s,
        "health": health_of(alerts),
        "dagster_url": inputs.dagster_url,
        "queue": queue,
        "inventory": inventory,
        "jobs": [job_entry(j, inputs.now) for j in inputs.jobs],
        "resources": resources,
        "sources": [
            {"model": src.model, "source": src.source, "reachable": src.reachable, "since": src.since,
             "checked_at": src.checked_at, "error": src.error, "last_reachable_at": src.last_reachable_at}
            for src in sorted(inputs.sources, key=lambda x: (x.model, x.source))
        ],
        "repairs": [
            {"model": r.model, "run": r.run, "hour": r.hour, "kind": r.kind, "problem": r.problem,
             "files": list(r.files), "opened_at": r.opened_at}
            for r in inputs.repairs
        ],
        "alerts": alerts,
    }


def summary_text(doc: Mapping[str, Any]) -> str:
    """A readable summary for the terminal."""
    q = doc["queue"]
    lines = [
        f"health: {doc['health'].upper()}   generated {doc['generated_at']}",
        f"queue: {q['pending']} pending, {q['active']} active, workers {q['workers_online']}/{q['workers_configured']}, "
        f"failed 1 h: {q['failed_1h']} of {q['finished_1h']} ({q['failure_rate_1h']:.0%}), daemon "
        + ("alive" if q["daemon_alive"] else "DOWN"),
        "runs:",
    ]
    for e in doc["inventory"][:20]:
        src = "?" if e["source_hours"] is None else e["source_hours"]
        miss = f" missing {_clip(format_hours(tuple(e['missing_hours'])))}" if e["missing_hours"] else ""
        tiles = (f" tiles missing {_clip(format_hours(tuple(e['tiles_missing_hours'])))}"
                 if e["tiles_missing_hours"] else "")
        why = f" ({e['reason']})" if e["reason"] else ""
        lines.append(f"  {e['model']:5} {e['run']}  {e['status']:11} have {e['hours_have']}/{e['hours_expected']} "
                     f"source {src}{miss}{tiles}{why}")
    for src in doc.get("sources", []):
        if not src["reachable"]:
            lines.append(f"source: {src['model']} {src['source']} UNREACHABLE since {src['since']}: {src['error']}")
    r = doc["resources"]
    lines.append(f"disk: {r['disk_total_bytes'] / 1e9:.2f} GB"
                 + (f" of {r['disk_budget_bytes'] / 1e9:.2f} GB budget" if r["disk_budget_bytes"] else "")
                 + f"; cache files {r['cache_oldest']} .. {r['cache_newest']}")
    for a in doc["alerts"]:
        lines.append(f"{a['level'].upper():8} {a['code']}: {a['message']}")
    return "\n".join(lines)

