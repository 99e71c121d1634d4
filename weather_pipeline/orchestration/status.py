"""Deep status from the Dagster instance and the cache, and the sensor that writes it.

Facts come from run storage (queue counts, recent runs, failures and their first error line),
the asset status cache (materialized partitions), daemon heartbeats, the ScanSource record of
what the source has, and the cache on disk; `core.status` turns them into the document.
"""

import json
import os
import socket
import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta, timezone

from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from weather_pipeline.core.cache import CacheLayout, CacheWriteError, atomic_write_text
from weather_pipeline.core.catalog import Catalog, InvalidRequest, load_catalog, parse_run_key
from weather_pipeline.core.prune import disk_usage
from weather_pipeline.core.repairs import open_tickets
from weather_pipeline.core.scan import load_availability, load_source_health
from weather_pipeline.core.status import (
    DEFAULT_MIN_FREE_BYTES,
    JobFacts,
    ModelPolicy,
    ModelRunFacts,
    QueueFacts,
    RepairFacts,
    SourceFacts,
    StatusInputs,
    compute_deep_status,
)
from weather_pipeline.orchestration.assets import grib_asset_name, tile_asset_name
from weather_pipeline.orchestration.jobs import MODEL_TAG, RUN_TAG, TASK_TAG
from weather_pipeline.orchestration.partitions import parse_partition_key, partition_key, run_partitions
from weather_pipeline.orchestration.resources import CacheResource
from weather_pipeline.orchestration.schedules import disk_budget_bytes
from weather_pipeline.orchestration.sensors import IN_FLIGHT, hours_in_range_tags

FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
RECENT_JOBS = 50
#: daemons whose heartbeat must be fresh for work to flow
REQUIRED_DAEMONS = ("SENSOR", "QUEUED_RUN_COORDINATOR")


def dagster_url() -> str:
    return os.environ.get("WEATHER_PIPELINE_DAGSTER_URL", "http://127.0.0.1:3000")


def _aware(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


#: (first error line, reason per partition key) by run id: a finished run's events never change,
#: and the code server that evaluates the sensor outlives its ticks (on SQLite each lookup opens
#: that run's own shard)
_FAILURES: "OrderedDict[str, tuple[str | None, dict[str, str]]]" = OrderedDict()
_FAILURE_MEMO_SIZE = 2000
_MEMO_LOCK = threading.Lock()
#: disk usage walks every cache file; rescan at most this often, and say when it was scanned
DISK_USAGE_TTL_S = float(os.environ.get("WEATHER_PIPELINE_DISK_SCAN_S", "300"))
_DISK: dict[str, tuple[float, dict]] = {}


def _failure(instance: DagsterInstance, run_id: str) -> tuple[str | None, dict[str, str]]:
    with _MEMO_LOCK:
        if run_id in _FAILURES:
            return _FAILURES[run_id]
    found = _read_failure(instance, run_id)
    with _MEMO_LOCK:
        _FAILURES[run_id] = found
        while len(_FAILURES) > _FAILURE_MEMO_SIZE:
            _FAILURES.popitem(last=False)
    return found


def _failure_line(instance: DagsterInstance, run_id: str) -> str | None:
    return _failure(instance, run_id)[0]


def cached_disk_usage(layout: CacheLayout) -> dict:
    key = str(layout.root)
    with _MEMO_LOCK:
        hit = _DISK.get(key)
    if hit and time.monotonic() - hit[0] < DISK_USAGE_TTL_S:
        return hit[1]
    usage = {**disk_usage(layout), "scanned_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with _MEMO_LOCK:
        _DISK[key] = (time.monotonic(), usage)
    return usage


def _read_failure(instance: DagsterInstance, run_id: str) -> tuple[str | None, dict[str, str]]:
    """The run's first error line, and the batch's reason per failed partition (its `failed`)."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE, limit=1).records
    if records:
        data = records[0].event_log_entry.dagster_event.step_failure_data
        if data.user_failure_data and data.user_failure_data.description:
            failed = data.user_failure_data.metadata.get("failed")
            per_key = {str(k): str(v) for k, v in (failed.value if failed is not None else {}).items()}
            return data.user_failure_data.description, per_key
        if data.error:
            cause = data.error.cause or data.error
            return cause.message, {}
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_FAILURE, limit=1).records
    message = records[0].event_log_entry.message if records else None
    # A run failed "from outside the execution context" (a launch that timed out, a worker that
    # died): the real cause is in the engine event Dagster logged just before.
    if message is None or "from outside the execution context" in message or "crash" in message.lower():
        engine = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, ascending=False,
                                              limit=20).records
        for rec in engine:
            data = rec.event_log_entry.dagster_event.engine_event_data if rec.event_log_entry.dagster_event else None
            if data is not None and data.error is not None:
                cause = data.error.cause or data.error
                return f"{rec.event_log_entry.message or ''} {cause.message}".strip(), {}
    return message, {}


def queue_facts(instance: DagsterInstance, now: datetime) -> QueueFacts:
    hour_ago = now - timedelta(hours=1)
    heartbeats = instance.get_daemon_heartbeats()
    stamps = [heartbeats[d].timestamp for d in REQUIRED_DAEMONS if d in heartbeats]
    age = None if len(stamps) < len(REQUIRED_DAEMONS) else now.timestamp() - min(stamps)
    queue_config = instance.get_concurrency_config().run_queue_config
    return QueueFacts(
        pending=instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED])),
        active=instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
                                                            DagsterRunStatus.CANCELING])),
        failed_1h=instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.FAILURE], updated_after=hour_ago)),
        finished_1h=instance.get_runs_count(RunsFilter(statuses=FINISHED, updated_after=hour_ago)),
        # An instance without a run queue (in-process, tests) runs one run at a time.
        max_concurrent_runs=queue_config.max_concurrent_runs if queue_config else 1,
        daemon_heartbeat_age_s=age,
    )


def model_run_facts(instance: DagsterInstance, layout: CacheLayout, catalog: Catalog, now: datetime) -> list[ModelRunFacts]:
    facts = []
    for model in catalog.models.values():
        cutoff = now - timedelta(hours=model.retention_hours)
        runs = []
        for run in instance.get_dynamic_partitions(run_partitions(model.name).name):
            try:
                if parse_run_key(run) >= cutoff:
                    runs.append(run)
            except InvalidRequest:
                continue
        if not runs:
            continue
        by_run: dict[str, dict[str, set[int]]] = {r: {"grib": set(), "tile": set()} for r in runs}
        for kind, asset in (("grib", grib_asset_name(model.name)), ("tile", tile_asset_name(model.name))):
            for key in instance.get_materialized_partitions(AssetKey(asset)):
                run, hour = parse_partition_key(key)
                if run in by_run:
                    by_run[run][kind].add(hour)
        availability = load_availability(layout, model)
        health = load_source_health(layout, model)
        down = [h for h in health.values() if not h.reachable]
        unreachable = ("; ".join(f"{h.source}: {h.error or 'no answer'}" for h in down)
                       if health and len(down) == len(health) else None)
        damaged: dict[str, set[int]] = {}
        for ticket in open_tickets(layout, model.name):
            damaged.setdefault(ticket.run, set()).add(ticket.hour)
        in_flight: dict[str, set[int]] = {}
        for r in instance.get_runs(RunsFilter(statuses=IN_FLIGHT, tags={MODEL_TAG: model.name})):
            in_flight.setdefault(r.tags.get(RUN_TAG, ""), set()).update(hours_in_range_tags(r.tags, model))
        failed: dict[tuple[str, str], dict[int, str]] = {}
        for rec in instance.get_run_records(
            RunsFilter(statuses=[DagsterRunStatus.FAILURE], tags={MODEL_TAG: model.name}, created_after=cutoff),
            limit=200,
        ):
            run_tag, task = rec.dagster_run.tags.get(RUN_TAG), rec.dagster_run.tags.get(TASK_TAG)
            if run_tag not in by_run:
                continue
            # Only failures of hours still missing matter (retried hours are explained already).
            done = by_run[run_tag]["grib" if task == "ingest_grib" else "tile"]
            hours = [h for h in hours_in_range_tags(rec.dagster_run.tags, model) if h not in done]
            target = failed.setdefault((run_tag, task or ""), {})
            todo = [h for h in hours if h not in target]  # records come newest first
            if todo:
                line, per_key = _failure(instance, rec.dagster_run.run_id)
                target.update({h: per_key.get(str(partition_key(run_tag, h))) or line or "run failed" for h in todo})
        for run in runs:
            avail = availability.get(run)
            facts.append(ModelRunFacts(
                model=model.name,
                run=run,
                run_time=parse_run_key(run),
                expected_hours=model.hours_for_run(run),
                grib_hours=frozenset(by_run[run]["grib"]),
                tile_hours=frozenset(by_run[run]["tile"]),
                source_hours=avail.hours if avail else None,
                in_flight_hours=frozenset(in_flight.get(run, set())),
                failed=failed.get((run, "ingest_grib"), {}),
                tile_failed=failed.get((run, "build_tile"), {}),
                unreachable=unreachable,
                damaged_hours=frozenset(damaged.get(run, set())),
            ))
    return facts


#: asset name suffix -> task, for runs whose tags do not name their task (CLI or UI runs)
_TASK_BY_SUFFIX = {"_grib": "ingest_grib", "_tiles": "build_tile"}


def _what_it_works_on(run) -> tuple[str | None, str | None, str | None]:
    """(task, model, run key) of a Dagster run from its asset selection and partition tags."""
    task = model = None
    for key in sorted(run.asset_selection or []):
        name = key.path[-1]
        for suffix, kind in _TASK_BY_SUFFIX.items():
            if name.endswith(suffix):
                task, model = kind, name[: -len(suffix)]
    part = run.tags.get("dagster/asset_partition_range_start") or run.tags.get("dagster/partition")
    run_key = None
    if part:
        try:
            run_key = parse_partition_key(part)[0]
        except InvalidRequest:
            run_key = None
    return task, model, run_key


def job_facts(instance: DagsterInstance, limit: int = RECENT_JOBS) -> list[JobFacts]:
    worker = f"{socket.gethostname()} (local run launcher)"
    records = {r.dagster_run.run_id: r for r in instance.get_run_records(RunsFilter(statuses=IN_FLIGHT), limit=limit)}
    for r in instance.get_run_records(limit=limit):
        records.setdefault(r.dagster_run.run_id, r)
    children = {r.dagster_run.parent_run_id: r.dagster_run.run_id for r in records.values()
                if r.dagster_run.parent_run_id}
    out = []
    for rec in sorted(records.values(), key=lambda r: r.create_timestamp, reverse=True)[:limit]:
        run = rec.dagster_run
        task, model, run_key = _what_it_works_on(run)
        out.append(JobFacts(
            run_id=run.run_id,
            job=run.job_name,
            status=run.status.value,
            tags=dict(run.tags),
            created_at=rec.create_timestamp,
            started_at=_aware(rec.start_time),
            ended_at=_aware(rec.end_time),
            error=_failure_line(instance, run.run_id) if run.status == DagsterRunStatus.FAILURE else None,
            worker=worker if rec.start_time else None,
            task=task,
            model=model,
            run=run_key,
            retried_as=children.get(run.run_id),
        ))
    return out


def gather(instance: DagsterInstance, layout: CacheLayout, *, now: datetime | None = None,
           catalog: Catalog | None = None) -> StatusInputs:
    catalog = catalog or load_catalog()
    now = now or datetime.now(timezone.utc)
    policies = []
    for m in catalog.models.values():
        spacing = min(b - a for a, b in zip(m.run_hours, m.run_hours[1:] + (m.run_hours[0] + 24,)))
        policies.append(ModelPolicy(m.name, spacing, m.publish_window_hours))
    sources = [SourceFacts(m.name, h.source, h.reachable, h.checked_at, h.since, h.error, h.last_reachable_at)
               for m in catalog.models.values() for h in load_source_health(layout, m).values()]
    repairs = [RepairFacts(t.model, t.run, t.hour, t.kind, t.problem, tuple(t.files), t.opened_at)
               for t in open_tickets(layout)]
    return StatusInputs(
        now=now,
        queue=queue_facts(instance, now),
        model_runs=model_run_facts(instance, layout, catalog, now),
        jobs=job_facts(instance),
        disk_usage=cached_disk_usage(layout),
        disk_budget_bytes=disk_budget_bytes(),
        policies=policies,
        dagster_url=dagster_url(),
        sources=sources,
        repairs=repairs,
        disk_free_bytes=layout.free_bytes(),
        min_free_bytes=int(float(os.environ.get("WEATHER_PIPELINE_MIN_FREE_GB", DEFAULT_MIN_FREE_BYTES / 1e9)) * 1e9),
        status_interval_s=float(status_interval_s()),
    )


def deep_status(instance: DagsterInstance, layout: CacheLayout, *, now: datetime | None = None) -> dict:
    return compute_deep_status(gather(instance, layout, now=now))


def write_deep_status(instance: DagsterInstance, layout: CacheLayout, *, now: datetime | None = None) -> dict:
    """Compute the document and write it atomically to deep.json (CacheWriteError if it cannot)."""
    doc = deep_status(instance, layout, now=now)
    atomic_write_text(layout.deep_status_path, json.dumps(doc, indent=1))
    return doc


def status_interval_s() -> int:
    return int(os.environ.get("WEATHER_PIPELINE_STATUS_INTERVAL_S", "30"))


@sensor(
    name="deep_status",
    minimum_interval_seconds=status_interval_s(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Writes cache/status/deep.json (queue health, per-run completeness and reasons, disk, alerts).",
)
def deep_status_sensor(context: SensorEvaluationContext, cache: CacheResource):
    try:
        doc = write_deep_status(context.instance, cache.layout())
    except CacheWriteError as exc:
        # A full disk must not kill the writer: the next tick tries again, the page shows its age.
        return SkipReason(f"deep status not written: {exc}")
    return SkipReason(
        f"wrote {cache.layout().deep_status_path}: {doc['health']}, {len(doc['inventory'])} runs, "
        f"{len(doc['alerts'])} alerts"
    )
