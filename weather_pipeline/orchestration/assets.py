"""Asset factories over the catalog: per model a GRIB asset (IngestGrib) and a tile asset (BuildTile).

(No `from __future__ import annotations` here: Dagster inspects the real context type.)

A run of the asset may cover many partitions (single-run backfill policy): all the hours of
one model run are fetched in one Dagster run, so process start-up is paid per batch.

Each hour is recorded as materialized (with its metadata) the moment its files are committed,
not at the end of the batch: when some hours of a batch fail, or the worker is killed, the
hours that landed stay materialized, are not fetched again and are not reported missing. The
assets are therefore generators with `output_required=False`: the runtime materializations are
the only ones. A step retry, a run retry or a re-execution of a failed batch skips the hours
that an earlier attempt of the same lineage already committed, once their files check out.
"""


import random
import time
import warnings
from collections import defaultdict

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    AssetsDefinition,
    BackfillPolicy,
    BetaWarning,
    DagsterInstance,
    Failure,
    MetadataValue,
    asset,
)

import numpy as np

from weather_pipeline.core.cache import CacheLayout, CacheWriteError
from weather_pipeline.core.catalog import InvalidRequest, Model, load_catalog
from weather_pipeline.core.ingest import IngestReport, ingest_hours, is_transient, verify_hour_files
from weather_pipeline.core.preview import preview_markdown
from weather_pipeline.core.repairs import REBUILD, REFETCH, close_tickets, open_ticket
from weather_pipeline.core.tiles import (
    GribNeedsRefetch,
    HourTiles,
    TileError,
    build_hour,
    retire_gribs,
    targets_for,
    update_run_tile,
)
from weather_pipeline.orchestration.checks import evaluate_tile_checks, tile_check_specs
from weather_pipeline.orchestration.partitions import model_partitions, parse_partition_key, partition_key
from weather_pipeline.orchestration.resources import CacheResource, NoaaSourceResource, TileSettings


def grib_asset_name(model_name: str) -> str:
    return f"{model_name}_grib"


def tile_asset_name(model_name: str) -> str:
    return f"{model_name}_tiles"


def _validated(context: AssetExecutionContext, model: Model) -> list[tuple[str, str, int]]:
    """(key, run, hour) of every partition of the run, checked before any work starts."""
    requested = [(str(key), *parse_partition_key(key)) for key in context.partition_keys]
    try:
        for _key, run, hour in requested:
            model.validate_hour(run, hour)
    except InvalidRequest as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    return sorted(requested, key=lambda r: (r[1], r[2]))


def ingest_metadata(report: IngestReport) -> dict:
    """What one forecast hour's ingest cost and produced, as Dagster metadata."""
    return {
        "source": report.source,
        "source_url": MetadataValue.url(report.url),
        "index": report.index,
        "variables": MetadataValue.json({v.variable: v.description for v in report.variables}),
        "md5": MetadataValue.json({v.variable: v.md5 for v in report.variables}),
        "files": MetadataValue.json({v.variable: v.path for v in report.variables}),
        "skipped": MetadataValue.json(report.skipped),
        "bytes_fetched": MetadataValue.int(report.bytes_fetched),
        "message_bytes": MetadataValue.int(report.message_bytes),
        "requests": MetadataValue.int(report.requests),
        "grib_range_requests": MetadataValue.int(report.grib_requests),
        "message_groups": MetadataValue.int(report.message_groups),
        "retries": MetadataValue.int(report.retries),
        "duration_s": MetadataValue.float(report.duration_s),
    }


# backfill_policy is marked beta in Dagster 1.13; it is the documented way to batch a range.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=BetaWarning)


#: Transient download trouble that outlasted the HTTP client's own retries: the hours it hit are
#: tried again, waiting 10 s, 20 s, 40 s (+-25 % jitter, so concurrent runs do not retry in step).
#: Done in the asset, not with a Dagster RetryPolicy: Dagster turns an interrupt (SIGTERM, Ctrl-C)
#: into a step retry when a policy is set, so `dagster asset materialize` would not stop.
DOWNLOAD_RETRY_DELAYS_S = (10.0, 20.0, 40.0)


def download_pool(source: str) -> str:
    """The concurrency pool of GRIB downloads from one source (limit set in dagster.yaml)."""
    return f"download_{source}"


def run_lineage(instance: DagsterInstance, run_id: str) -> set[str]:
    """This run and the runs it retries or re-executes (its parent chain)."""
    ids = {run_id}
    run = instance.get_run_by_id(run_id)
    while run is not None and run.parent_run_id and run.parent_run_id not in ids:
        ids.add(run.parent_run_id)
        run = instance.get_run_by_id(run.parent_run_id)
    return ids


def latest_materializations(instance: DagsterInstance, asset_key: AssetKey, partition_keys: list[str]) -> dict:
    """The newest materialization record of each of these partitions (absent: never)."""
    latest: dict = {}
    for start in range(0, len(partition_keys), 200):
        chunk = partition_keys[start:start + 200]
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=asset_key, asset_partitions=chunk), limit=len(chunk) * 4
        ).records
        for rec in records:  # newest first
            latest.setdefault(rec.partition_key, rec)
    return latest


def recorded_md5(record) -> dict[str, str] | None:
    md5 = record.asset_materialization.metadata.get("md5") if record is not None else None
    return dict(md5.value) if md5 is not None else None


def _batch_failure(model: Model, requested: list, failures: dict[str, str], transient: bool, task: str) -> Failure:
    return Failure(
        description=f"{len(failures)} of {len(requested)} {model.name} hours failed ({task}): "
        + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5]),
        metadata={"failed": MetadataValue.json(failures)},
        allow_retries=transient,
    )


def _committed_in_lineage(context: AssetExecutionContext, model: Model, asset_key: AssetKey,
                          requested: list, layout: CacheLayout) -> set[str]:
    """Partitions an earlier attempt of this run's lineage committed and whose files check out."""
    lineage = run_lineage(context.instance, context.run.run_id)
    latest = latest_materializations(context.instance, asset_key, [key for key, _r, _h in requested])
    done = set()
    for key, run, hour in requested:
        rec = latest.get(key)
        md5 = recorded_md5(rec)
        if rec is None or rec.run_id not in lineage or md5 is None:
            continue
        if not verify_hour_files(model, run, hour, layout, md5):
            done.add(key)
    return done


def build_grib_asset(model: Model, pool: str | None = None,
                     retry_delays_s: tuple[float, ...] = DOWNLOAD_RETRY_DELAYS_S) -> AssetsDefinition:
    asset_key = AssetKey(grib_asset_name(model.name))

    @asset(
        name=grib_asset_name(model.name),
        group_name=model.name,
        partitions_def=model_partitions(model),
        backfill_policy=BackfillPolicy.single_run(),
        pool=pool,
        kinds={"grib2"},
        output_required=False,
        description=(
            f"{model.title}: the default variables of each forecast hour as GRIB2 subsets, "
            f"fetched by .idx byte ranges, at cache/gribs/{model.name}/{{run}}/{{variable}}/grib_{{hour:03d}}.grib2."
        ),
        tags={"model": model.name, "task": "ingest_grib"},
    )
    def _grib(context: AssetExecutionContext, cache: CacheResource, noaa: NoaaSourceResource):
        requested = _validated(context, model)
        layout = cache.layout()
        settings = noaa.source_settings()
        failures: dict[str, str] = {}
        totals: dict[str, int] = defaultdict(int)
        done = _committed_in_lineage(context, model, asset_key, requested, layout)
        if done:
            context.log.info(f"{len(done)} of {len(requested)} hours were committed by an earlier attempt; not fetched again")
        pending = [r for r in requested if r[0] not in done]
        ok: set = set()
        with noaa.client() as client:
            for attempt, delay in enumerate((0.0, *retry_delays_s)):
                if attempt:
                    wait = delay * random.uniform(0.75, 1.25)
                    context.log.warning(f"{len(pending)} hours failed on transient trouble; trying them again in "
                                        f"{wait:.0f} s (attempt {attempt + 1} of {len(retry_delays_s) + 1})")
                    time.sleep(wait)
                retry: list = []
                keys = {(run, hour): key for key, run, hour in pending}
                disk_full = False
                batch = ingest_hours(
                    model.name, [(run, hour) for _k, run, hour in pending], hours_at_once=noaa.hours_at_once,
                    cache=layout, client=client, settings=settings, allow_full_download=noaa.allow_full_download,
                )
                with batch:
                    for i, (run, hour, result) in enumerate(batch, start=1):
                        key = keys[(run, hour)]
                        if isinstance(result, BaseException):
                            failures[str(key)] = f"{type(result).__name__}: {result}"
                            context.log.error(f"[{i}/{len(pending)}] {model.name} {run} f{hour:03d} failed: {result}")
                            if isinstance(result, CacheWriteError):
                                # a full disk fails every later hour too: start no more, retry none
                                disk_full = True
                                for r, h in batch.cancel_pending():
                                    failures[str(keys[(r, h)])] = "not attempted: the cache could not be written"
                            elif is_transient(result):
                                retry.append((key, run, hour))
                            continue
                        failures.pop(str(key), None)
                        # Recorded now, hour by hour: a later failure or a killed worker cannot undo it.
                        context.log_event(AssetMaterialization(asset_key=asset_key, partition=str(key),
                                                               metadata=ingest_metadata(result)))
                        close_tickets(layout, model.name, run, hour, (REFETCH,))
                        totals["bytes"] += result.bytes_fetched
                        totals["requests"] += result.requests
                        context.log.info(
                            f"[{i}/{len(pending)}] {model.name} {run} f{hour:03d}: {len(result.variables)} variables, "
                            f"{result.message_bytes / 1e6:.2f} MB in {result.requests} requests from {result.source}"
                            + (f" ({result.index})" if result.index != "remote .idx" else "")
                        )
                pending = [] if disk_full else retry
                if not pending:
                    break
        if failures:
            # Only transient trouble (the network, a server's 5xx) was tried again: a mismatched
            # message, a full disk or an unpublished hour will not change in a minute. The hours
            # that landed are materialized already.
            raise _batch_failure(model, requested, failures, False, "IngestGrib")
        context.log.info(
            f"{model.name}: {len(requested)} hours, {totals['bytes'] / 1e6:.2f} MB, {totals['requests']} requests"
        )
        if False:  # a generator: the runtime materializations above are the asset's only ones
            yield

    return _grib


def tile_metadata(report: HourTiles, preview: str | None, freed: int) -> dict:
    first = {}
    for r in report.results:
        first.setdefault(r.variable, r.stats)
    return {
        "status": "built" if report.built else "unchanged: source md5s match the sidecars, nothing rebuilt",
        "tiles_built": MetadataValue.int(len(report.built)),
        "tiles_unchanged": MetadataValue.int(len(report.unchanged)),
        "tiles": MetadataValue.json(sorted({r.path for r in report.results})),
        "stats": MetadataValue.json(first),
        "method": report.method,
        "decode_s": MetadataValue.float(round(report.decode_s, 3)),
        "regrid_s": MetadataValue.float(round(report.regrid_s, 3)),
        "write_s": MetadataValue.float(round(report.write_s, 3)),
        "gribs_deleted_bytes": MetadataValue.int(freed),
        **({"preview": MetadataValue.md(preview)} if preview else {}),
    }


def build_tile_asset(model: Model) -> AssetsDefinition:
    key = AssetKey(tile_asset_name(model.name))
    grib_key = AssetKey(grib_asset_name(model.name))
    catalog = load_catalog()
    regions = ", ".join(f"{t.region} at {t.res:g} deg" for t in targets_for(model.name, catalog))

    @asset(
        name=key.path[-1],
        group_name=model.name,
        partitions_def=model_partitions(model),
        deps=[grib_key],
        backfill_policy=BackfillPolicy.single_run(),
        check_specs=tile_check_specs(key),
        kinds={"numpy"},
        output_required=False,
        description=(
            f"{model.title}: regional NPZ tiles with JSON sidecars ({regions}) at "
            f"cache/tiles/{{region}}/{{res}}deg/{model.name}/{{run}}/{{variable}}/tile_{{hour:03d}}.npz, "
            "and the run tiles {variable}.npz stacking every hour present."
        ),
        tags={"model": model.name, "task": "build_tile"},
    )
    def _tiles(context: AssetExecutionContext, cache: CacheResource, tiling: TileSettings):
        requested = _validated(context, model)
        layout = cache.layout()
        keep = tiling.keeps_gribs(model)
        reports: list[HourTiles] = []
        failures: dict[str, str] = {}
        latest = latest_materializations(context.instance, grib_key, [k for k, _r, _h in requested])
        ingested = {(run, hour): recorded_md5(latest.get(pkey)) for pkey, run, hour in requested}
        for i, (pkey, run, hour) in enumerate(requested, start=1):
            try:
                report = build_hour(model.name, run, hour, layout, method=tiling.method, catalog=catalog,
                                    expected_md5=ingested[(run, hour)])
            except GribNeedsRefetch as exc:
                # The GRIB changed on disk or is corrupt: quarantined; ScanSource fetches it again.
                open_ticket(layout, model.name, run, hour, REFETCH, str(exc),
                            [str(exc.path)] + ([str(exc.quarantined)] if exc.quarantined else []))
                failures[pkey] = f"{type(exc).__name__}: {exc}"
                context.log.error(f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d}: {exc}")
                continue
            except (TileError, ValueError, OSError) as exc:
                failures[pkey] = f"{type(exc).__name__}: {exc}"
                context.log.error(f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d}: {exc}")
                if isinstance(exc, CacheWriteError):
                    failures.update({k: "not attempted: the cache could not be written"
                                     for k, _r, _h in requested[i:]})
                    break
                continue
            reports.append(report)
            freed = 0 if keep else retire_gribs(layout, report)
            preview = None
            if report.results:
                shown = next((r for r in report.results if r.variable == "t2m"), report.results[0])
                with np.load(shown.path) as z:
                    preview = preview_markdown(z["data"], f"{shown.variable} {shown.region} {shown.res:g} deg, "
                                               f"{run} f{hour:03d}", model.variables[shown.variable].units)
            context.log_event(AssetMaterialization(asset_key=key, partition=pkey,
                                                   metadata=tile_metadata(report, preview, freed)))
            close_tickets(layout, model.name, run, hour, (REBUILD,))
            context.log.info(
                f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d}: {len(report.built)} tiles built, "
                f"{len(report.unchanged)} unchanged" + (f", {freed / 1e6:.1f} MB of GRIB retired" if freed else "")
            )
        # Run tiles: once per (run, region, res, variable) of this batch, rewritten only when stale.
        touched = {(rep.run, r.region, r.res, r.variable) for rep in reports for r in rep.results}
        for run, region, res, variable in sorted(touched):
            update_run_tile(layout, region, res, model.name, run, variable)
        if failures:
            raise _batch_failure(model, requested, failures, False, "BuildTile")
        context.log.info(f"{model.name}: run tiles current for {len(touched)} run/region/resolution/variable sets")
        yield from evaluate_tile_checks(model, catalog, reports, ingested)

    return _tiles
