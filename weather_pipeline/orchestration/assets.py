"""Asset factories over the catalog: per model a GRIB asset (IngestGrib) and a tile asset (BuildTile).

(No `from __future__ import annotations` here: Dagster inspects the real context type.)

A run of the asset may cover many partitions (single-run backfill policy): all the hours of
one model run are fetched in one Dagster run, so process start-up is paid per batch.
"""


import warnings
from collections import defaultdict

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    Backoff,
    BackfillPolicy,
    BetaWarning,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

import numpy as np

from weather_pipeline.core.catalog import InvalidRequest, Model, load_catalog
from weather_pipeline.core.http import TransientError
from weather_pipeline.core.ingest import IngestReport, ingest_hour
from weather_pipeline.core.preview import preview_markdown
from weather_pipeline.core.tiles import HourTiles, TileError, build_hour, retire_gribs, targets_for, update_run_tile
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


#: Transient download trouble that outlasted the HTTP client's own retries: try the step again
#: a few times, waiting 10 s, 20 s, 40 s (+-jitter) so concurrent runs do not retry in step.
DOWNLOAD_RETRY_POLICY = RetryPolicy(max_retries=3, delay=10, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


def download_pool(source: str) -> str:
    """The concurrency pool of GRIB downloads from one source (limit set in dagster.yaml)."""
    return f"download_{source}"


def build_grib_asset(model: Model, pool: str | None = None) -> AssetsDefinition:
    @asset(
        name=grib_asset_name(model.name),
        group_name=model.name,
        partitions_def=model_partitions(model),
        backfill_policy=BackfillPolicy.single_run(),
        retry_policy=DOWNLOAD_RETRY_POLICY,
        pool=pool,
        kinds={"grib2"},
        description=(
            f"{model.title}: the default variables of each forecast hour as GRIB2 subsets, "
            f"fetched by .idx byte ranges, at cache/gribs/{model.name}/{{run}}/{{variable}}/grib_{{hour:03d}}.grib2."
        ),
        tags={"model": model.name, "task": "ingest_grib"},
    )
    def _grib(context: AssetExecutionContext, cache: CacheResource, noaa: NoaaSourceResource) -> None:
        requested = _validated(context, model)
        layout = cache.layout()
        settings = noaa.source_settings()
        failures: dict[str, str] = {}
        transient = False
        totals: dict[str, int] = defaultdict(int)
        with noaa.client() as client:
            for i, (key, run, hour) in enumerate(requested, start=1):
                try:
                    report = ingest_hour(
                        model.name, run, hour, cache=layout, client=client, settings=settings,
                        allow_full_download=noaa.allow_full_download,
                    )
                except Exception as exc:  # noqa: BLE001 - one bad hour must not hide the others' results
                    failures[str(key)] = f"{type(exc).__name__}: {exc}"
                    transient = transient or isinstance(exc, (TransientError, OSError))
                    context.log.error(f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d} failed: {exc}")
                    continue
                context.add_asset_metadata(ingest_metadata(report), partition_key=str(key))
                totals["bytes"] += report.bytes_fetched
                totals["requests"] += report.requests
                context.log.info(
                    f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d}: {len(report.variables)} variables, "
                    f"{report.message_bytes / 1e6:.2f} MB in {report.requests} requests from {report.source}"
                    + (f" ({report.index})" if report.index != "remote .idx" else "")
                )
        if failures:
            # A single-run batch succeeds or fails as a whole in Dagster's eyes; files of the
            # hours that worked stay in the cache and are fetched again on retry. Only transient
            # trouble (the network, a server's 5xx) is worth the step's retry policy: an hour
            # that is not published or a bad inventory will not change in a minute.
            raise Failure(
                description=f"{len(failures)} of {len(requested)} {model.name} hours failed: "
                + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5]),
                metadata={"failed": MetadataValue.json(failures)},
                allow_retries=transient,
            )
        context.log.info(
            f"{model.name}: {len(requested)} hours, {totals['bytes'] / 1e6:.2f} MB, {totals['requests']} requests"
        )

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


def _ingested_md5(context: AssetExecutionContext, model: Model, key: str) -> dict[str, str] | None:
    """md5 per variable that the GRIB asset recorded for this partition (None if never)."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(grib_asset_name(model.name)), asset_partitions=[key]), limit=1
    ).records
    if not records:
        return None
    md5 = records[0].asset_materialization.metadata.get("md5")
    return dict(md5.value) if md5 is not None else None


def build_tile_asset(model: Model) -> AssetsDefinition:
    key = AssetKey(tile_asset_name(model.name))
    catalog = load_catalog()
    regions = ", ".join(f"{t.region} at {t.res:g} deg" for t in targets_for(model.name, catalog))

    @asset(
        name=key.path[-1],
        group_name=model.name,
        partitions_def=model_partitions(model),
        deps=[AssetKey(grib_asset_name(model.name))],
        backfill_policy=BackfillPolicy.single_run(),
        check_specs=tile_check_specs(key),
        kinds={"numpy"},
        description=(
            f"{model.title}: regional NPZ tiles with JSON sidecars ({regions}) at "
            f"cache/tiles/{{region}}/{{res}}deg/{model.name}/{{run}}/{{variable}}/tile_{{hour:03d}}.npz, "
            "and the run tiles {variable}.npz stacking every hour present."
        ),
        tags={"model": model.name, "task": "build_tile"},
    )
    def _tiles(context: AssetExecutionContext, cache: CacheResource, tiling: TileSettings) -> MaterializeResult:
        requested = _validated(context, model)
        layout = cache.layout()
        keep = tiling.keeps_gribs(model)
        reports: list[HourTiles] = []
        failures: dict[str, str] = {}
        for i, (pkey, run, hour) in enumerate(requested, start=1):
            try:
                report = build_hour(model.name, run, hour, layout, method=tiling.method, catalog=catalog)
            except (TileError, ValueError, OSError) as exc:
                failures[pkey] = f"{type(exc).__name__}: {exc}"
                context.log.error(f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d}: {exc}")
                continue
            reports.append(report)
            freed = 0 if keep else retire_gribs(layout, report)
            preview = None
            if report.results:
                shown = next((r for r in report.results if r.variable == "t2m"), report.results[0])
                with np.load(shown.path) as z:
                    preview = preview_markdown(z["data"], f"{shown.variable} {shown.region} {shown.res:g} deg, "
                                               f"{run} f{hour:03d}", model.variables[shown.variable].units)
            context.add_asset_metadata(tile_metadata(report, preview, freed), partition_key=pkey)
            context.log.info(
                f"[{i}/{len(requested)}] {model.name} {run} f{hour:03d}: {len(report.built)} tiles built, "
                f"{len(report.unchanged)} unchanged" + (f", {freed / 1e6:.1f} MB of GRIB retired" if freed else "")
            )
        # Run tiles: once per (run, region, res, variable) of this batch, rewritten only when stale.
        touched = {(rep.run, r.region, r.res, r.variable) for rep in reports for r in rep.results}
        for run, region, res, variable in sorted(touched):
            update_run_tile(layout, region, res, model.name, run, variable)
        if failures:
            raise Failure(
                description=f"{len(failures)} of {len(requested)} {model.name} hours failed: "
                + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5]),
                metadata={"failed": MetadataValue.json(failures)},
            )
        ingested = {(rep.run, rep.hour): _ingested_md5(context, model, str(partition_key(rep.run, rep.hour)))
                    for rep in reports}
        context.log.info(f"{model.name}: run tiles current for {len(touched)} run/region/resolution/variable sets")
        return MaterializeResult(check_results=evaluate_tile_checks(model, catalog, reports, ingested))

    return _tiles
