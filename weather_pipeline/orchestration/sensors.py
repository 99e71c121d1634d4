"""Sensors: ScanSource (new runs and hours at the source) and tiles following GRIBs.

Why a sensor for tiles rather than declarative automation: `AutomationCondition.eager()` would
batch the hours of a run into one run as well, but its runs belong to an anonymous asset job
with fixed tags. This sensor launches the named `{model}_build_tile` job with the same
`model`/`run`/`task` tags and `dagster/priority` as the ingest that triggered it, so the runs
table reads like a job table and a new model run's tiles overtake old gap-fill work.
"""


import json
import os
from datetime import datetime, timezone
from typing import Iterable, Sequence

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from weather_pipeline.core.catalog import Model, parse_run_key
from weather_pipeline.core.repairs import REBUILD, REFETCH, open_tickets
from weather_pipeline.core.scan import (
    candidate_runs,
    contiguous_batches,
    load_availability,
    published_hours,
    save_availability,
    settled_availability,
)
from weather_pipeline.orchestration.assets import grib_asset_name, latest_materializations, tile_asset_name
from weather_pipeline.orchestration.jobs import (
    MODEL_TAG,
    PRIORITY_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    RUN_TAG,
    TASK_TAG,
)
from weather_pipeline.orchestration.partitions import parse_partition_key, partition_key, run_partitions
from weather_pipeline.orchestration.resources import CacheResource, NoaaSourceResource

IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
#: gap-fill work runs below every live run (live runs are >= 1)
GAP_FILL_PRIORITY = -10
#: after this many failed runs of the same hours the sensor leaves them to gap fill
MAX_AUTOMATIC_ATTEMPTS = 3


def utcnow() -> datetime:
    """The sensors' clock (tests pin it to the mirror's runs)."""
    return datetime.now(timezone.utc)


def scan_interval_s() -> int:
    return int(os.environ.get("WEATHER_PIPELINE_SCAN_INTERVAL_S", "60"))


def scan_request_budget() -> int:
    return int(os.environ.get("WEATHER_PIPELINE_SCAN_MAX_REQUESTS", "40"))


def run_priority(run: str, now: datetime) -> int:
    """Newer runs first: 100 for a run started within the hour, one less per hour of age."""
    age_h = int((now - parse_run_key(run)).total_seconds() // 3600)
    return max(1, 100 - max(0, age_h))


def batch_tags(model: Model, run: str, hours: Sequence[int], task: str, priority: int) -> dict[str, str]:
    return {
        RANGE_START_TAG: str(partition_key(run, hours[0])),
        RANGE_END_TAG: str(partition_key(run, hours[-1])),
        PRIORITY_TAG: str(priority),
        MODEL_TAG: model.name,
        RUN_TAG: run,
        TASK_TAG: task,
    }


def hours_in_range_tags(tags: dict[str, str], model: Model) -> list[int]:
    """The forecast hours a run covers, from its partition tags (range or single key)."""
    if RANGE_START_TAG in tags and RANGE_END_TAG in tags:
        first = parse_partition_key(tags[RANGE_START_TAG])[1]
        last = parse_partition_key(tags[RANGE_END_TAG])[1]
        return [h for h in model.all_hours if first <= h <= last]
    if "dagster/partition" in tags:
        return [parse_partition_key(tags["dagster/partition"])[1]]
    return []


def in_flight_hours(instance, model: Model, run: str, task: str) -> set[int]:
    runs = instance.get_runs(
        RunsFilter(statuses=IN_FLIGHT, tags={MODEL_TAG: model.name, RUN_TAG: run, TASK_TAG: task})
    )
    return {h for r in runs for h in hours_in_range_tags(r.tags, model)}


def failed_attempts(instance, model: Model, run: str, hours: Iterable[int]) -> int:
    """How many ingest runs covering any of these hours failed in their own step.

    Only a step that ran and failed is an attempt at the hours: a run killed with its worker,
    stopped with the daemon (a stopped demo), canceled or never launched says nothing about the
    source, and Dagster's run retries deal with crashes. Those do not count toward giving up.
    """
    wanted = set(hours)
    runs = instance.get_runs(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE],
                   tags={MODEL_TAG: model.name, RUN_TAG: run, TASK_TAG: "ingest_grib"}),
        limit=50,
    )
    return sum(1 for r in runs if wanted & set(hours_in_range_tags(r.tags, model))
               and instance.get_records_for_run(r.run_id, of_type=DagsterEventType.STEP_FAILURE, limit=1).records)


def materialized_hours(instance, model: Model, run: str, asset_key: AssetKey) -> set[int]:
    keys = {str(partition_key(run, h)) for h in model.hours_for_run(run)}
    done = instance.get_materialized_partitions(asset_key)
    return {parse_partition_key(k)[1] for k in keys & set(done)}


def build_scan_source_sensor(model: Model, ingest_job) -> SensorDefinition:
    grib_key = AssetKey(grib_asset_name(model.name))

    @sensor(
        name=f"{model.name}_scan_source",
        target=ingest_job,
        minimum_interval_seconds=scan_interval_s(),
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            f"ScanSource for {model.name}: finds new runs and published hours at the source (S3 listing, "
            f".idx presence), adds run partitions and requests one {ingest_job.name} run per batch of "
            "contiguous new hours of a model run."
        ),
    )
    def _scan(context: SensorEvaluationContext, cache: CacheResource, noaa: NoaaSourceResource):
        now = utcnow()
        instance = context.instance
        cursor = json.loads(context.cursor) if context.cursor else {}
        # Hours found damaged in the cache are fetched again even though Dagster has them.
        refetch: dict[str, set[int]] = {}
        for ticket in open_tickets(cache.layout(), model.name):
            if ticket.kind == REFETCH:
                refetch.setdefault(ticket.run, set()).add(ticket.hour)
        complete: set[str] = set(cursor.get("complete", [])) - set(refetch)
        known = set(instance.get_dynamic_partitions(run_partitions(model.name).name))
        runs = [r for r in candidate_runs(model, now) if r not in complete]
        # runs older than the lookback are asked again only to repair damaged hours of them
        retention = candidate_runs(model, now, lookback_hours=model.retention_hours)
        runs += [r for r in sorted(refetch, reverse=True) if r not in runs and r in retention]
        budget = scan_request_budget()
        settings = noaa.source_settings()
        # Runs complete at the source, or settled past their publish window, are not asked again.
        settled = settled_availability(model, runs, load_availability(cache.layout(), model), now)
        availability = list(settled.values())
        with noaa.client() as client:
            for run in runs:
                if run in settled:
                    continue
                if client.stats.requests >= budget:
                    break
                availability.append(
                    published_hours(model, run, client, settings, now=now,
                                    max_requests=budget - client.stats.requests)
                )
        if availability:
            save_availability(cache.layout(), availability, now=now)

        new_runs, requests, unreachable, gave_up = [], [], set(), []
        for avail in availability:
            if not avail.answered:
                # No source could be asked: it is down, not empty. What we knew still stands
                # (save_availability keeps it); nothing is requested until it answers again.
                unreachable.update(avail.unreachable)
                continue
            if not avail.hours:
                continue
            if avail.run not in known:
                new_runs.append(avail.run)
            have = materialized_hours(instance, model, avail.run, grib_key) if avail.run in known else set()
            have -= refetch.get(avail.run, set())
            todo = sorted(set(avail.hours) - have - in_flight_hours(instance, model, avail.run, "ingest_grib"))
            for batch in contiguous_batches(todo, model):
                attempt = failed_attempts(instance, model, avail.run, batch)
                if attempt >= MAX_AUTOMATIC_ATTEMPTS:
                    note = (f"{avail.run} hours {batch[0]}-{batch[-1]}: {attempt} failed runs, left to gap fill "
                            "(weather-pipeline gaps plan)")
                    context.log.warning(f"{model.name} {note}")
                    gave_up.append(note)
                    continue
                requests.append(RunRequest(
                    run_key=f"{model.name}:{avail.run}:{batch[0]:03d}-{batch[-1]:03d}:{attempt}",
                    tags=batch_tags(model, avail.run, batch, "ingest_grib", run_priority(avail.run, now)),
                ))
            if avail.complete and set(avail.hours) <= have:
                complete.add(avail.run)
        # Only runs still in the lookback matter; keep the cursor small.
        lookback = set(candidate_runs(model, now))
        new_cursor = json.dumps({"complete": sorted(complete & lookback)})
        dynamic = [run_partitions(model.name).build_add_request(sorted(new_runs))] if new_runs else []
        if not requests and not dynamic:
            down = ""
            if unreachable:
                errors = {a.error for a in availability if not a.answered and a.error}
                down = (f"; SOURCE UNREACHABLE: {', '.join(sorted(unreachable))} ({'; '.join(sorted(errors))[:300]}), "
                        "last known availability kept")
            return SensorResult(skip_reason=SkipReason(
                f"checked {len(availability)} runs; nothing new "
                f"({', '.join(f'{a.run}: {len(a.hours)}/{len(a.expected)} h' if a.answered else f'{a.run}: unreachable' for a in availability) or 'no runs'})"
                + down + ("; " + "; ".join(gave_up) if gave_up else "")
            ), cursor=new_cursor)
        return SensorResult(run_requests=requests, dynamic_partitions_requests=dynamic, cursor=new_cursor)

    return _scan


def build_tiles_follow_gribs_sensor(model: Model, tile_job) -> SensorDefinition:
    grib_key = AssetKey(grib_asset_name(model.name))
    tile_key = AssetKey(tile_asset_name(model.name))

    @sensor(
        name=f"{model.name}_tiles_follow_gribs",
        target=tile_job,
        minimum_interval_seconds=5,
        default_status=DefaultSensorStatus.RUNNING,
        description=(f"Requests {tile_job.name} for batches of {model.name} GRIB hours that their own run did not "
                     "tile (GRIBs materialized alone, tiles that failed), once that run has ended, and for hours "
                     "whose damaged tiles must be rebuilt (repair tickets)."),
    )
    def _follow(context: SensorEvaluationContext, cache: CacheResource):
        after = int(context.cursor or 0)
        records = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=grib_key, after_storage_id=after), limit=1000, ascending=True
        ).records
        rebuild = [t for t in open_tickets(cache.layout(), model.name) if t.kind == REBUILD]
        if not records and not rebuild:
            return SkipReason("no new GRIB materializations, no tiles to rebuild")
        now = utcnow()
        by_run: dict[str, set[int]] = {}
        # A run may tile its own GRIBs (the ingest job does, hour by hour): wait while a run that
        # wrote GRIBs is in flight (the cursor stops before its first one), then follow only the
        # hours with no tile materialized since their GRIB (a GRIB-only run, or a tile that
        # failed in the run).
        follow, last_id = [], after
        in_flight: dict[str, bool] = {}
        for rec in records:
            if rec.run_id not in in_flight:
                dagster_run = context.instance.get_run_by_id(rec.run_id)
                in_flight[rec.run_id] = dagster_run is not None and dagster_run.status in IN_FLIGHT
            if in_flight[rec.run_id]:
                break
            follow.append(rec)
            last_id = rec.storage_id
        tiled = latest_materializations(context.instance, tile_key, sorted({r.partition_key for r in follow}))
        for rec in follow:
            done = tiled.get(rec.partition_key)
            if done is not None and done.storage_id > rec.storage_id:
                continue
            run, hour = parse_partition_key(rec.partition_key)
            by_run.setdefault(run, set()).add(hour)
        requests = [
            RunRequest(
                run_key=f"tiles:{model.name}:{run}:{batch[0]:03d}-{batch[-1]:03d}:{last_id}",
                tags=batch_tags(model, run, batch, "build_tile", run_priority(run, now)),
            )
            for run, hours in sorted(by_run.items(), reverse=True)
            for batch in contiguous_batches(sorted(hours), model)
        ]
        for ticket in rebuild:  # the run key makes one request per ticket, however many ticks see it
            requests.append(RunRequest(
                run_key=f"rebuild:{model.name}:{ticket.run}:{ticket.hour:03d}:{ticket.opened_at}",
                tags=batch_tags(model, ticket.run, [ticket.hour], "build_tile", run_priority(ticket.run, now)),
            ))
        if not requests:
            return SensorResult(skip_reason=SkipReason(
                f"{len(follow)} new GRIB materializations, all tiled by their own runs"
                + ("; waiting for a run still writing GRIBs" if len(follow) < len(records) else "")), cursor=str(last_id))
        return SensorResult(run_requests=requests, cursor=str(last_id))

    return _follow

