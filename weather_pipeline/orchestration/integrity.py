"""Cache verification as asset checks: `{model}_grib` / gribs_match_ingest and `{model}_tiles` /
tiles_match_sidecars, run together by the `verify_cache` job (hourly, and from the UI).

(No `from __future__ import annotations`: Dagster inspects the real context and config types.)

Each check lists the damaged files in its metadata; the damaged files are quarantined and a
repair ticket opened per hour, which the sensors turn into a re-ingest or a tile rebuild
(core/integrity.py, core/repairs.py). Files unchanged since they were last found good are not
read again unless the run's config says `full: true`.

Two plain asset checks rather than one multi-check: `dagster asset materialize --select
hrrr_grib` (and the UI's Materialize) select an asset's checks with it, and a multi-check cannot
be split; so a hand materialization verifies what it wrote. The daemon's ingest and tile jobs
leave them out (orchestration/jobs.py): verification is the hourly verify_cache run's work.
"""

import os
from datetime import datetime, timedelta, timezone

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetSelection,
    Config,
    DefaultScheduleStatus,
    MetadataValue,
    ScheduleDefinition,
    define_asset_job,
    asset_check,
)

from weather_pipeline.core.catalog import InvalidRequest, Model, parse_run_key
from weather_pipeline.core.integrity import (
    Verification,
    _Memory,
    load_memory,
    repair_damage,
    save_memory,
    verify_gribs,
    verify_tiles,
)
from weather_pipeline.core.tiles import targets_for
from weather_pipeline.orchestration.assets import (
    grib_asset_name,
    latest_materializations,
    recorded_md5,
    tile_asset_name,
)
from weather_pipeline.orchestration.jobs import TASK_TAG
from weather_pipeline.orchestration.partitions import parse_partition_key
from weather_pipeline.orchestration.resources import CacheResource, TileSettings

GRIB_CHECK = "gribs_match_ingest"
TILE_CHECK = "tiles_match_sidecars"


class VerifyCacheConfig(Config):
    full: bool = False  # read every file, not only those changed since they were last found good


def _recent(keys, model: Model, now: datetime) -> list[str]:
    cutoff = now - timedelta(hours=model.retention_hours)
    out = []
    for key in keys:
        try:
            run, _hour = parse_partition_key(key)
            if parse_run_key(run) >= cutoff:
                out.append(key)
        except InvalidRequest:
            continue
    return sorted(out)


def _verification(context, model: Model, layout, kept: bool, full: bool, kind: str):
    """Verify one kind ("grib" or "tile") of the model's files within retention; repair damage."""
    instance = context.instance
    grib_key, tile_key = AssetKey(grib_asset_name(model.name)), AssetKey(tile_asset_name(model.name))
    targets = targets_for(model.name)
    now = datetime.now(timezone.utc)
    memory = _Memory(load_memory(layout, f"{model.name}_{kind}"), full)
    grib_keys = _recent(instance.get_materialized_partitions(grib_key), model, now)
    tile_keys = set(_recent(instance.get_materialized_partitions(tile_key), model, now))
    gribs = latest_materializations(instance, grib_key, grib_keys)
    result = Verification()
    hours = 0
    for key in grib_keys:
        run, hour = parse_partition_key(key)
        recorded = recorded_md5(gribs.get(key)) or {}
        if kind == "grib":
            verify_gribs(layout, model, run, hour, recorded, targets, memory, result, kept=kept)
            hours += 1
        elif key in tile_keys:
            verify_tiles(layout, model, run, hour, targets, recorded, memory, result)
            hours += 1
    tickets = repair_damage(layout, result.damage)
    save_memory(layout, f"{model.name}_{kind}", result, now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    context.log.info(f"{model.name} {kind}s: {result.checked} files read, {result.unchanged} unchanged since found "
                     f"good, {len(result.damage)} damaged; {len(tickets)} repair tickets opened")
    damaged = [f"{d.run} f{d.hour:03d} {d.variable}: {d}" for d in result.damage][:200]
    return AssetCheckResult(
        passed=not damaged,
        severity=AssetCheckSeverity.ERROR,
        description=(f"{len(result.damage)} damaged files (quarantined; the hours are being "
                     f"{'fetched again' if kind == 'grib' else 'rebuilt'})") if damaged else f"{hours} hours verified",
        metadata={"files_read": result.checked, "files_unchanged": result.unchanged,
                  "damaged": MetadataValue.json(damaged),
                  "repair_tickets": MetadataValue.json([f"{t.model} {t.run} f{t.hour:03d} {t.kind}" for t in tickets])},
    )


def build_cache_checks(model: Model) -> list:
    """The two verification checks of one model (GRIB subsets; tiles and sidecars)."""

    @asset_check(
        asset=AssetKey(grib_asset_name(model.name)), name=GRIB_CHECK,
        description=("Every GRIB subset within retention still has the md5 its ingest recorded (or was retired "
                     "after every tile of its hour was built from it). Damaged files are quarantined and re-fetched."),
    )
    def _gribs(context: AssetCheckExecutionContext, config: VerifyCacheConfig, cache: CacheResource,
               tiling: TileSettings) -> AssetCheckResult:
        return _verification(context, model, cache.layout(), tiling.keeps_gribs(model), config.full, "grib")

    @asset_check(
        asset=AssetKey(tile_asset_name(model.name)), name=TILE_CHECK,
        description=("Every hourly tile within retention opens, lies on its region's grid and holds the values its "
                     "sidecar describes, built from the GRIB the ingest recorded. Damaged tiles are quarantined and rebuilt."),
    )
    def _tiles(context: AssetCheckExecutionContext, config: VerifyCacheConfig, cache: CacheResource,
               tiling: TileSettings) -> AssetCheckResult:
        return _verification(context, model, cache.layout(), tiling.keeps_gribs(model), config.full, "tile")

    return [_gribs, _tiles]


def cache_check_keys(models) -> list[AssetCheckKey]:
    return [key for m in models for key in (AssetCheckKey(AssetKey(grib_asset_name(m.name)), GRIB_CHECK),
                                            AssetCheckKey(AssetKey(tile_asset_name(m.name)), TILE_CHECK))]


def build_verify_cache_job(models):
    return define_asset_job(
        "verify_cache",
        selection=AssetSelection.checks(*cache_check_keys(models)),
        tags={TASK_TAG: "verify_cache"},
        description="VerifyCache: GRIB subsets and tiles on disk against what the pipeline recorded; "
                    "damaged files are quarantined and their hours repaired by the sensors.",
    )


def build_verify_cache_schedule(job) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="verify_cache_schedule",
        job=job,
        cron_schedule=os.environ.get("WEATHER_PIPELINE_VERIFY_CRON", "41 * * * *"),
        default_status=DefaultScheduleStatus.RUNNING,
        description="Runs verify_cache hourly (at minute 41 by default); only changed files are read again.",
    )

