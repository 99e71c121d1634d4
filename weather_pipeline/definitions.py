"""The Dagster code location: assets, jobs, sensors and the schedule, built from the catalog.

Resources come from the environment (see orchestration/resources.py); the GRIB assets' download
pool is named after the first configured source, so its limit in dagster.yaml applies per source.

Every job runs in-process: each of our runs has a single step, and the default multiprocess
executor would start a second Python process per run for it (measured at 4-18 s of a run's
latency on 2 cores, see docs/benchmarks.md). Parallelism comes from the run queue instead.
"""

import os

from dagster import Definitions, in_process_executor

from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.orchestration.assets import build_model_assets, download_pool
from weather_pipeline.orchestration.integrity import build_cache_checks, build_verify_cache_job, build_verify_cache_schedule
from weather_pipeline.orchestration.jobs import build_ingest_job, build_tile_job
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline.orchestration.schedules import prune_cache_job, prune_cache_schedule
from weather_pipeline.orchestration.sensors import build_scan_source_sensor, build_tiles_follow_gribs_sensor
from weather_pipeline.orchestration.status import deep_status_sensor


def build_definitions(env: dict[str, str] | None = None) -> Definitions:
    env = dict(os.environ if env is None else env)
    catalog = load_catalog()
    pool = download_pool(env.get("WEATHER_PIPELINE_SOURCES", "aws,nomads").split(",")[0].strip())
    assets, jobs, sensors, checks = [], [prune_cache_job], [deep_status_sensor], []
    verify_job = build_verify_cache_job(catalog.models.values())
    jobs.append(verify_job)
    for model in catalog.models.values():
        assets.append(build_model_assets(model, pool=pool))
        checks += build_cache_checks(model)
        ingest, tiles = build_ingest_job(model), build_tile_job(model)
        jobs += [ingest, tiles]
        sensors += [build_scan_source_sensor(model, ingest), build_tiles_follow_gribs_sensor(model, tiles)]
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=[prune_cache_schedule, build_verify_cache_schedule(verify_job)],
        resources=resources_from_env(env),
        executor=in_process_executor,
    )


defs = build_definitions()
