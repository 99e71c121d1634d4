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
from pathlib import Path
import warnings
from collections import defaultdict

from typing import Iterator

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    BetaWarning,
    DagsterInstance,
    Failure,
    MetadataValue,
    multi_asset,
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


def _tiled_in_lineage(context: AssetExecutionContext, tile_key: AssetKey, requested: list) -> set[str]:
    """Partitions whose tiles an earlier attempt of this run's lineage materialized, files still there."""
    lineage = run_lineage(context.instance, context.run.run_id)
    latest = latest_materializations(context.instance, tile_key, [key for key, _r, _h in requested])
    done = set()
    for key, _run, _hour in requested:
        rec = latest.get(key)
        if rec is None or rec.run_id not in lineage:
            continue
        paths = rec.asset_materialization.metadata.get("tiles")
        if paths is not None and all(Path(p).is_file() for p in paths.value):
            done.add(key)
    return done


def _ingest_batch(context: AssetExecutionContext, model: Model, asset_key: AssetKey, requested: list,
                  layout: CacheLayout, noaa: NoaaSourceResource, retry_delays_s: tuple[float, ...],
                  failures: dict[str, str]) -> Iterator[tuple[str, str, int, IngestReport | None]]:
    """IngestGrib over a batch: yields (partition key, run, hour, report) for every hour that
    landed, the moment it landed (report None: committed by an earlier attempt of this run's
    lineage); failed hours end up in `failures`. Transient trouble is tried again after
    `retry_delays_s`; a full disk stops the batch."""
    settings = noaa.source_settings()
    totals: dict[str, int] = defaultdict(int)
    done = _committed_in_lineage(context, model, asset_key, requested, layout)
    if done:
        context.log.info(f"{len(done)} of {len(requested)} hours were committed by an earlier attempt; not fetched again")
        for key, run, hour in requested:
            if key in done:
                yield key, run, hour, None
    pending = [r for r in requested if r[0] not in done]
    with noaa.client() as client:
        for attempt, delay in enumerate((0.0, *retry_delays_s)):
            if not pending:
                break
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
                    yield str(key), run, hour, result
            pending = [] if disk_full else retry
    context.log.info(f"{model.name}: {len(requested)} hours, {totals['bytes'] / 1e6:.2f} MB, {totals['requests']} requests")


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


class _TileBatch:
    """BuildTile over the hours of a batch, one hour at a time as its GRIBs are ready."""

    def __init__(self, context: AssetExecutionContext, model: Model, catalog, key: AssetKey, layout: CacheLayout,
                 tiling: TileSettings, failures: dict[str, str], refetch=None):
        self.context, self.model, self.catalog, self.key, self.layout = context, model, catalog, key, layout
        self.tiling, self.failures, self.refetch = tiling, failures, refetch
        self.keep = tiling.keeps_gribs(model)
        self.reports: list[HourTiles] = []
        self.ingested: dict[tuple[str, int], dict[str, str] | None] = {}
        self.disk_full = False

    def build(self, pkey: str, run: str, hour: int, md5: dict[str, str] | None, label: str) -> None:
        """Tile one hour whose GRIBs the ingest recorded with `md5`; failures are recorded.
        A GRIB found corrupt at the decode is fetched again once (`refetch`), when this run can."""
        model, layout = self.model, self.layout
        self.ingested[(run, hour)] = md5
        if self.disk_full:
            self.failures[pkey] = "not attempted: the cache could not be written"
            return
        for attempt in (1, 2):
            try:
                report = build_hour(model.name, run, hour, layout, method=self.tiling.method, catalog=self.catalog,
                                    expected_md5=md5)
                break
            except GribNeedsRefetch as exc:
                if attempt == 1 and self.refetch is not None:
                    self.context.log.warning(f"{label} {model.name} {run} f{hour:03d}: {exc}; fetching the hour again")
                    md5 = self.refetch(pkey, run, hour)
                    self.ingested[(run, hour)] = md5
                    if md5 is not None:
                        continue
                # The GRIB changed on disk or is corrupt: quarantined; ScanSource fetches it again.
                open_ticket(layout, model.name, run, hour, REFETCH, str(exc),
                            [str(exc.path)] + ([str(exc.quarantined)] if exc.quarantined else []))
                self.failures[pkey] = f"{type(exc).__name__}: {exc}"
                self.context.log.error(f"{label} {model.name} {run} f{hour:03d}: {exc}")
                return
            except (TileError, ValueError, OSError) as exc:
                self.failures[pkey] = f"{type(exc).__name__}: {exc}"
                self.context.log.error(f"{label} {model.name} {run} f{hour:03d}: {exc}")
                self.disk_full = isinstance(exc, CacheWriteError)
                return
        self.reports.append(report)
        freed = 0 if self.keep else retire_gribs(layout, report)
        preview = None
        if report.results:
            shown = next((r for r in report.results if r.variable == "t2m"), report.results[0])
            with np.load(shown.path) as z:
                preview = preview_markdown(z["data"], f"{shown.variable} {shown.region} {shown.res:g} deg, "
                                           f"{run} f{hour:03d}", model.variables[shown.variable].units)
        self.context.log_event(AssetMaterialization(asset_key=self.key, partition=pkey,
                                                    metadata=tile_metadata(report, preview, freed)))
        close_tickets(layout, model.name, run, hour, (REBUILD,))
        self.context.log.info(
            f"{label} {model.name} {run} f{hour:03d}: {len(report.built)} tiles built, "
            f"{len(report.unchanged)} unchanged" + (f", {freed / 1e6:.1f} MB of GRIB retired" if freed else "")
        )

    def finish(self) -> list:
        """Run tiles (once per run/region/res/variable of the batch, rewritten when stale); the
        checks over what was built."""
        touched = {(rep.run, r.region, r.res, r.variable) for rep in self.reports for r in rep.results}
        for run, region, res, variable in sorted(touched):
            update_run_tile(self.layout, region, res, self.model.name, run, variable)
        self.context.log.info(f"{self.model.name}: run tiles current for {len(touched)} run/region/resolution/variable sets")
        return evaluate_tile_checks(self.model, self.catalog, self.reports, self.ingested) if self.reports else []


def build_model_assets(model: Model, pool: str | None = None,
                       retry_delays_s: tuple[float, ...] = DOWNLOAD_RETRY_DELAYS_S) -> AssetsDefinition:
    """The GRIB asset (IngestGrib) and the tile asset (BuildTile) of one model, as one subsettable
    step: a run that selects both fetches each hour and tiles it as soon as it lands, in one
    process (the ingest job, launched by ScanSource); a run of one of them does only that."""
    grib_key, tile_key = AssetKey(grib_asset_name(model.name)), AssetKey(tile_asset_name(model.name))
    catalog = load_catalog()
    partitions = model_partitions(model)
    regions = ", ".join(f"{t.region} at {t.res:g} deg" for t in targets_for(model.name, catalog))
    specs = [
        AssetSpec(
            grib_key, group_name=model.name, partitions_def=partitions, kinds={"grib2"}, skippable=True,
            tags={"model": model.name, "task": "ingest_grib"},
            description=(
                f"{model.title}: the default variables of each forecast hour as GRIB2 subsets, fetched by .idx "
                f"byte ranges, at cache/gribs/{model.name}/{{run}}/{{variable}}/grib_{{hour:03d}}.grib2."
            ),
        ),
        AssetSpec(
            tile_key, group_name=model.name, partitions_def=partitions, kinds={"numpy"}, skippable=True,
            deps=[grib_key], tags={"model": model.name, "task": "build_tile"},
            description=(
                f"{model.title}: regional NPZ tiles with JSON sidecars ({regions}) at "
                f"cache/tiles/{{region}}/{{res}}deg/{model.name}/{{run}}/{{variable}}/tile_{{hour:03d}}.npz, "
                "and the run tiles {variable}.npz stacking every hour present."
            ),
        ),
    ]

    @multi_asset(
        name=f"{model.name}_grib_and_tiles",
        specs=specs,
        check_specs=tile_check_specs(tile_key),
        can_subset=True,
        backfill_policy=BackfillPolicy.single_run(),
        pool=pool,
        op_tags={"model": model.name},
    )
    def _assets(context: AssetExecutionContext, cache: CacheResource, noaa: NoaaSourceResource, tiling: TileSettings):
        requested = _validated(context, model)
        layout = cache.layout()
        selected = context.selected_asset_keys
        grib_failures: dict[str, str] = {}
        tile_failures: dict[str, str] = {}
        tiles = None
        if tile_key in selected:
            refetch = None
            if grib_key in selected:
                def refetch(pkey: str, run: str, hour: int) -> dict[str, str] | None:
                    again = list(_ingest_batch(context, model, grib_key, [(pkey, run, hour)], layout, noaa, (),
                                               grib_failures))
                    return {v.variable: v.md5 for v in again[0][3].variables} if again and again[0][3] else None
            tiles = _TileBatch(context, model, catalog, tile_key, layout, tiling, tile_failures, refetch)
        if grib_key in selected:
            todo = requested
            if tiles is not None:
                # hours an earlier attempt of this lineage tiled (their GRIBs may be retired since)
                tiled = _tiled_in_lineage(context, tile_key, requested)
                if tiled:
                    context.log.info(f"{len(tiled)} of {len(requested)} hours were fetched and tiled by an earlier "
                                     "attempt; not done again")
                todo = [r for r in requested if r[0] not in tiled]
            landed = []
            for pkey, run, hour, report in _ingest_batch(context, model, grib_key, todo, layout, noaa,
                                                         retry_delays_s, grib_failures):
                landed.append((pkey, run, hour, report))
                if tiles is not None and report is not None:
                    # tiled as it lands: the next hours download meanwhile
                    tiles.build(pkey, run, hour, {v.variable: v.md5 for v in report.variables},
                                f"[{len(landed)}/{len(requested)}]")
            if tiles is not None:
                # hours an earlier attempt committed: their md5s are in Dagster
                earlier = [(k, r, h) for k, r, h, rep in landed if rep is None]
                latest = latest_materializations(context.instance, grib_key, [k for k, _r, _h in earlier])
                for k, r, h in earlier:
                    tiles.build(k, r, h, recorded_md5(latest.get(k)), "[earlier]")
        elif tiles is not None:
            latest = latest_materializations(context.instance, grib_key, [k for k, _r, _h in requested])
            for i, (pkey, run, hour) in enumerate(requested, start=1):
                tiles.build(pkey, run, hour, recorded_md5(latest.get(pkey)), f"[{i}/{len(requested)}]")
        checks = tiles.finish() if tiles is not None else []
        if grib_failures:
            # Only transient trouble (the network, a server's 5xx) was tried again: a mismatched
            # message, a full disk or an unpublished hour will not change in a minute. The hours
            # that landed are materialized already.
            raise _batch_failure(model, requested, grib_failures, False, "IngestGrib")
        if tile_failures:
            raise _batch_failure(model, requested, tile_failures, False, "BuildTile")
        yield from checks

    return _assets


def grib_only(model: Model, **kwargs) -> dict:
    """`materialize(**grib_only(model), ...)`: the model's assets, the GRIB asset selected (IngestGrib alone)."""
    return {"assets": [build_model_assets(model, **kwargs)], "selection": [AssetKey(grib_asset_name(model.name))]}


def tiles_only(model: Model) -> dict:
    """`materialize(**tiles_only(model), ...)`: the tile asset and its checks (BuildTile from cached GRIBs)."""
    return {"assets": [build_model_assets(model)], "selection": [AssetKey(tile_asset_name(model.name))]}


def grib_and_tiles(model: Model, **kwargs) -> dict:
    """`materialize(**grib_and_tiles(model), ...)`: both, one step, as the ingest job runs them."""
    return {"assets": [build_model_assets(model, **kwargs)],
            "selection": [AssetKey(grib_asset_name(model.name)), AssetKey(tile_asset_name(model.name))]}
