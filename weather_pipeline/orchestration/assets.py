"""Asset factories over the catalog: one GRIB asset per model (IngestGrib).

(No `from __future__ import annotations` here: Dagster inspects the real context type.)

A run of the asset may cover many partitions (single-run backfill policy): all the hours of
one model run are fetched in one Dagster run, so process start-up is paid per batch.
"""


import warnings
from collections import defaultdict

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    BetaWarning,
    Failure,
    MetadataValue,
    asset,
)

from weather_pipeline.core.catalog import InvalidRequest, Model
from weather_pipeline.core.ingest import IngestReport, ingest_hour
from weather_pipeline.orchestration.partitions import model_partitions, parse_partition_key
from weather_pipeline.orchestration.resources import CacheResource, NoaaSourceResource


def grib_asset_name(model_name: str) -> str:
    return f"{model_name}_grib"


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


def build_grib_asset(model: Model) -> AssetsDefinition:
    @asset(
        name=grib_asset_name(model.name),
        group_name=model.name,
        partitions_def=model_partitions(model),
        backfill_policy=BackfillPolicy.single_run(),
        kinds={"grib2"},
        description=(
            f"{model.title}: the default variables of each forecast hour as GRIB2 subsets, "
            f"fetched by .idx byte ranges, at cache/gribs/{model.name}/{{run}}/{{variable}}/grib_{{hour:03d}}.grib2."
        ),
        tags={"model": model.name, "task": "ingest_grib"},
    )
    def _grib(context: AssetExecutionContext, cache: CacheResource, noaa: NoaaSourceResource) -> None:
        requested = [(key, *parse_partition_key(key)) for key in context.partition_keys]
        # Check every requested partition before fetching anything: a bad key names itself.
        try:
            for _key, run, hour in requested:
                model.validate_hour(run, hour)
        except InvalidRequest as exc:
            raise Failure(description=str(exc), allow_retries=False) from None
        layout = cache.layout()
        settings = noaa.source_settings()
        failures: dict[str, str] = {}
        totals: dict[str, int] = defaultdict(int)
        with noaa.client() as client:
            for i, (key, run, hour) in enumerate(sorted(requested, key=lambda r: (r[1], r[2])), start=1):
                try:
                    report = ingest_hour(
                        model.name, run, hour, cache=layout, client=client, settings=settings,
                        allow_full_download=noaa.allow_full_download,
                    )
                except Exception as exc:  # noqa: BLE001 - one bad hour must not hide the others' results
                    failures[str(key)] = f"{type(exc).__name__}: {exc}"
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
            # hours that worked stay in the cache and are fetched again on retry.
            raise Failure(
                description=f"{len(failures)} of {len(requested)} {model.name} hours failed: "
                + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5]),
                metadata={"failed": MetadataValue.json(failures)},
            )
        context.log.info(
            f"{model.name}: {len(requested)} hours, {totals['bytes'] / 1e6:.2f} MB, {totals['requests']} requests"
        )

    return _grib
