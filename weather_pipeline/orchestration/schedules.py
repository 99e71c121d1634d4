"""PruneCache: the `prune_cache` job and its hourly schedule.

(No `from __future__ import annotations`: Dagster inspects the real context types.)

Each run: drops model runs older than their retention, then the oldest runs while the cache is
over its disk budget; deletes the dynamic partitions of the runs it drops (keeping partition
counts bounded, which the UI needs); deletes Dagster run records older than the history
retention; removes temp files left by crashed writers. It never drops a model run that has an
ingest or tile run queued or in progress. What it removed and the bytes freed are the step's
output metadata and the run's tags.
"""


import os
from datetime import datetime, timedelta, timezone

from dagster import (
    DagsterRunStatus,
    DefaultScheduleStatus,
    MetadataValue,
    OpExecutionContext,
    Output,
    RunsFilter,
    ScheduleDefinition,
    job,
    op,
)

from weather_pipeline.core.catalog import InvalidRequest, load_catalog, parse_run_key
from weather_pipeline.core.prune import clean_stale_temp_files, execute_prune, plan_prune, runs_on_disk
from weather_pipeline.orchestration.jobs import MODEL_TAG, RUN_TAG, TASK_TAG
from weather_pipeline.orchestration.partitions import run_partitions
from weather_pipeline.orchestration.resources import CacheResource
from weather_pipeline.orchestration.sensors import IN_FLIGHT

FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]


def disk_budget_bytes() -> int | None:
    gb = os.environ.get("WEATHER_PIPELINE_DISK_BUDGET_GB")
    return int(float(gb) * 1e9) if gb else None


def history_retention_days() -> float:
    return float(os.environ.get("WEATHER_PIPELINE_RUN_HISTORY_DAYS", "14"))


def busy_model_runs(instance) -> set[tuple[str, str]]:
    """(model, run) of every queued or running Dagster run that works on a model run."""
    return {
        (r.tags[MODEL_TAG], r.tags[RUN_TAG])
        for r in instance.get_runs(RunsFilter(statuses=IN_FLIGHT))
        if MODEL_TAG in r.tags and RUN_TAG in r.tags
    }


@op(description="Plan and apply cache retention, disk budget, partition and run-history pruning.")
def prune_cache_op(context: OpExecutionContext, cache: CacheResource):
    instance = context.instance
    catalog = load_catalog()
    layout = cache.layout()
    now = datetime.now(timezone.utc)
    busy = busy_model_runs(instance)
    plan = plan_prune(
        runs_on_disk(layout),
        now=now,
        retention_hours={m.name: m.retention_hours for m in catalog.models.values()},
        budget_bytes=disk_budget_bytes(),
        busy=busy,
    )
    # Work may be queued between planning and deleting: re-check each run just before it goes.
    result = execute_prune(layout, plan, is_busy=lambda model, run: (model, run) in busy_model_runs(instance))

    # Partitions: those of the runs just removed, and any run partition older than retention.
    deleted_partitions: list[str] = []
    removed = {(r.model, r.run) for r in result.removed}
    for model in catalog.models.values():
        pdef = run_partitions(model.name)
        for run in instance.get_dynamic_partitions(pdef.name):
            try:
                too_old = now - parse_run_key(run) > timedelta(hours=model.retention_hours)
            except InvalidRequest:
                too_old = True
            if ((model.name, run) in removed or too_old) and (model.name, run) not in busy:
                instance.delete_dynamic_partition(pdef.name, run)
                deleted_partitions.append(f"{pdef.name}:{run}")

    # Run history: finished runs older than the history retention.
    cutoff = now - timedelta(days=history_retention_days())
    old_runs = instance.get_run_records(RunsFilter(statuses=FINISHED, created_before=cutoff), limit=5000)
    for record in old_runs:
        instance.delete_run(record.dagster_run.run_id)

    stale = clean_stale_temp_files(layout, now=now)
    freed = result.bytes_freed
    instance.add_run_tags(context.run_id, {
        "bytes_freed": str(freed),
        "model_runs_removed": str(len(result.removed)),
    })
    context.log.info(
        f"removed {len(result.removed)} model runs ({freed / 1e6:.1f} MB), {len(deleted_partitions)} partitions, "
        f"{len(old_runs)} run records, {len(stale)} stale temp files; kept {len(plan.protected)} busy runs"
    )
    return Output(
        None,
        metadata={
            "bytes_freed": MetadataValue.int(freed),
            "removed": MetadataValue.json([{"model": r.model, "run": r.run, "bytes": r.bytes_freed, "reason": r.reason}
                                           for r in result.removed]),
            "skipped": MetadataValue.json([{"model": r.model, "run": r.run, "reason": why} for r, why in result.skipped]),
            "warnings": MetadataValue.json(plan.warnings),
            "protected": MetadataValue.json([{"model": r.model, "run": r.run, "reason": why}
                                             for r, why in plan.protected]),
            "partitions_deleted": MetadataValue.json(deleted_partitions),
            "run_records_deleted": MetadataValue.int(len(old_runs)),
            "stale_temp_files_removed": MetadataValue.int(len(stale)),
            "errors": MetadataValue.json([str(e) for e in result.errors]),
        },
    )


@job(name="prune_cache", tags={TASK_TAG: "prune_cache"},
     description="PruneCache: retention by run age, disk budget, partitions and run history.")
def prune_cache_job():
    prune_cache_op()


prune_cache_schedule = ScheduleDefinition(
    name="prune_cache_schedule",
    job=prune_cache_job,
    cron_schedule=os.environ.get("WEATHER_PIPELINE_PRUNE_CRON", "17 * * * *"),
    default_status=DefaultScheduleStatus.RUNNING,
    description="Runs prune_cache hourly (at minute 17 by default, off the top of the hour when runs land).",
)
