"""Gap fill, plan / dispatch / verify.

- plan: for each model run in the window, what the source has minus what the GRIB asset has
  materialized, one JSON line per missing (model, run, hour);
- dispatch: one Dagster asset backfill per model run at low priority; the backfill daemon
  batches each contiguous range of hours into one run (single-run backfill policy), exactly as
  ScanSource does, and the tiles follow through their sensor;
- verify: every manifest entry is materialized now, or it is listed and the exit status is 1.

An hour already queued or running (a run of the model run, or a backfill in progress) is not
planned again. A source that cannot be reached is not "nothing to fill": plan stops asking it
(its circuit breaker answers at once) and raises PlanIncomplete naming it, with the gaps that
the reachable sources showed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

from dagster import AssetKey, DagsterInstance, RunsFilter

from weather_pipeline.core.catalog import Catalog, Model, format_run_key, load_catalog, parse_run_key
from weather_pipeline.core.scan import published_hours
from weather_pipeline.orchestration.assets import grib_asset_name
from weather_pipeline.orchestration.jobs import MODEL_TAG, PRIORITY_TAG, RUN_TAG, TASK_TAG
from weather_pipeline.orchestration.partitions import partition_key, run_partitions
from weather_pipeline.orchestration.resources import NoaaSourceResource
from weather_pipeline.orchestration.sensors import GAP_FILL_PRIORITY, IN_FLIGHT, hours_in_range_tags


class PlanIncomplete(Exception):
    """Some sources could not be reached: the plan lists only what the others showed."""

    def __init__(self, gaps: list["Gap"], unreachable: dict[str, str]):
        hosts = "; ".join(f"{where}: {why}" for where, why in sorted(unreachable.items()))
        super().__init__(f"source unreachable, plan incomplete: {hosts}")
        self.gaps = gaps
        self.unreachable = unreachable


@dataclass(frozen=True)
class Gap:
    model: str
    run: str
    hour: int
    source: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str, lineno: int = 0) -> "Gap":
        try:
            d = json.loads(line)
            return cls(str(d["model"]), str(d["run"]), int(d["hour"]), d.get("source"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"manifest line {lineno}: not a gap entry ({exc}): {line[:100]!r}") from None


def runs_between(model: Model, since: datetime, now: datetime) -> list[str]:
    """Every run key of the model with since <= run time <= now, newest first."""
    out, t = [], model.latest_run_before(now)
    while t >= since:
        out.append(format_run_key(t))
        t = model.latest_run_before(t - timedelta(hours=1))
    return out


def materialized_keys(instance: DagsterInstance, model: Model) -> set[str]:
    return set(instance.get_materialized_partitions(AssetKey(grib_asset_name(model.name))))


def pending_keys(instance: DagsterInstance, model: Model) -> set[str]:
    """GRIB partitions of the model that queued or running work will materialize."""
    keys: set[str] = set()
    for run in instance.get_runs(RunsFilter(statuses=IN_FLIGHT, tags={MODEL_TAG: model.name, TASK_TAG: "ingest_grib"})):
        if RUN_TAG in run.tags:
            keys |= {str(partition_key(run.tags[RUN_TAG], h)) for h in hours_in_range_tags(run.tags, model)}
    from dagster._core.execution.backfill import BulkActionStatus

    asset_key = AssetKey(grib_asset_name(model.name))
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED):
        data = backfill.asset_backfill_data
        if data is None or asset_key not in data.target_subset.asset_keys:
            continue
        keys |= {str(k) for k in data.get_target_partitions_subset(asset_key).get_partition_keys()}
    return keys


def plan(
    instance: DagsterInstance,
    noaa: NoaaSourceResource,
    *,
    models: Sequence[str] | None = None,
    since: str | None = None,
    now: datetime | None = None,
    catalog: Catalog | None = None,
    progress=lambda msg: None,
) -> list[Gap]:
    catalog = catalog or load_catalog()
    now = now or datetime.now(timezone.utc)
    gaps: list[Gap] = []
    unreachable: dict[str, str] = {}
    settings = noaa.source_settings()
    with noaa.client() as client:
        for name in models or list(catalog.models):
            model = catalog.model(name)
            start = parse_run_key(since) if since else now - timedelta(hours=model.retention_hours)
            done = materialized_keys(instance, model) | pending_keys(instance, model)
            for run in runs_between(model, start, now):
                avail = published_hours(model, run, client, settings, now=now, max_requests=60, catalog=catalog)
                if not avail.answered:
                    for source in avail.unreachable:
                        unreachable.setdefault(f"{model.name} on {source}", avail.error or "unreachable")
                    progress(f"{model.name} {run}: SOURCE UNREACHABLE ({avail.error})")
                    continue
                missing = [h for h in avail.hours if str(partition_key(run, h)) not in done]
                progress(f"{model.name} {run}: source has {len(avail.hours)} h, missing {len(missing)}")
                gaps += [Gap(model.name, run, h, avail.source) for h in missing]
    if unreachable:
        raise PlanIncomplete(gaps, unreachable)
    return gaps


def read_manifest(lines: Iterable[str]) -> list[Gap]:
    return [Gap.from_json(line, i) for i, line in enumerate(lines, 1) if line.strip()]


def dispatch(instance: DagsterInstance, gaps: Sequence[Gap], *, catalog: Catalog | None = None) -> list[str]:
    """One asset backfill per (model, run), low priority; returns the backfill ids."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from weather_pipeline.definitions import build_definitions

    catalog = catalog or load_catalog()
    asset_graph = build_definitions().resolve_asset_graph()
    by_run: dict[tuple[str, str], list[int]] = {}
    for g in gaps:
        catalog.model(g.model).validate_hour(g.run, g.hour)
        by_run.setdefault((g.model, g.run), []).append(g.hour)
    ids = []
    for (model_name, run), hours in sorted(by_run.items()):
        # The run's partition must exist before anything can target it.
        instance.add_dynamic_partitions(run_partitions(model_name).name, [run])
        backfill_id = make_new_backfill_id()
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=asset_graph,
            partition_names=[str(partition_key(run, h)) for h in sorted(set(hours))],
            asset_selection=[AssetKey(grib_asset_name(model_name))],
            backfill_timestamp=time.time(),
            tags={PRIORITY_TAG: str(GAP_FILL_PRIORITY), MODEL_TAG: model_name, RUN_TAG: run,
                  TASK_TAG: "ingest_grib", "gap_fill": "true"},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=f"gap fill {model_name} {run}",
            description=f"weather-pipeline gaps dispatch: {len(set(hours))} hours of {model_name} {run}",
            run_config=None,
        )
        instance.add_backfill(backfill)
        ids.append(backfill_id)
    return ids


def verify(instance: DagsterInstance, gaps: Sequence[Gap], *, catalog: Catalog | None = None) -> list[Gap]:
    """The manifest entries still not materialized."""
    catalog = catalog or load_catalog()
    done: dict[str, set[str]] = {}
    still = []
    for g in gaps:
        if g.model not in done:
            done[g.model] = materialized_keys(instance, catalog.model(g.model))
        if str(partition_key(g.run, g.hour)) not in done[g.model]:
            still.append(g)
    return still


def summarize(gaps: Sequence[Gap]) -> str:
    by_run: dict[tuple[str, str], list[int]] = {}
    for g in gaps:
        by_run.setdefault((g.model, g.run), []).append(g.hour)
    return "; ".join(f"{m} {r}: hours {','.join(str(h) for h in sorted(hs))}" for (m, r), hs in sorted(by_run.items()))

