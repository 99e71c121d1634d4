"""`make demo`: the whole flow on embedded defaults against a generated local mirror.

1. generate a small NOAA-identical mirror (one HRRR and one GFS run, a few hours each);
2. serve it on a free loopback port;
3. add the run partitions to the project's Dagster instance ($DAGSTER_HOME) and materialize
   each model's GRIB and tile assets, one Dagster run per model run (a partition range);
4. print what landed in the cache, read back from the instance's materializations, and the
   tile files written.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from dagster import AssetKey, DagsterInstance, materialize

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import format_run_key, load_catalog
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline.orchestration.assets import build_grib_asset, build_tile_asset, grib_asset_name
from weather_pipeline.orchestration.partitions import partition_key, run_partitions
from weather_pipeline.orchestration.resources import resources_from_env

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def _say(msg: str) -> None:
    print(msg, flush=True)


def contiguous_groups(hours: Sequence[int], all_hours: Sequence[int]) -> list[list[int]]:
    """Split hours into runs of neighbours in the model's hour list (a range must be a rectangle)."""
    position = {h: i for i, h in enumerate(all_hours)}
    groups: list[list[int]] = []
    for h in sorted(hours):
        if groups and position[h] == position[groups[-1][-1]] + 1:
            groups[-1].append(h)
        else:
            groups.append([h])
    return groups


def demo_run_key(model_name: str, now: datetime) -> str:
    """The newest long (00/06/12/18z) run at least three hours old, as a live cache would see."""
    model = load_catalog().model(model_name)
    t = model.latest_run_before(now - timedelta(hours=3))
    while t.hour % 6:
        t = model.latest_run_before(t - timedelta(hours=1))
    return format_run_key(t)


def run_demo(workdir: Path, hrrr_hours: Sequence[int], gfs_hours: Sequence[int]) -> int:
    t_start = time.monotonic()
    if not os.environ.get("DAGSTER_HOME"):
        print("weather-pipeline demo: DAGSTER_HOME is not set; run `make demo` (it points DAGSTER_HOME at ./.dagster_home)",
              file=sys.stderr)
        return 2
    catalog = load_catalog()
    workdir = workdir.absolute()
    mirror_root, cache_root = workdir / "mirror", workdir / "cache"
    now = datetime.now(timezone.utc)
    plan = {"hrrr": (demo_run_key("hrrr", now), list(hrrr_hours)), "gfs": (demo_run_key("gfs", now), list(gfs_hours))}
    for name, (run, hours) in plan.items():
        for h in hours:
            catalog.model(name).validate_hour(run, h)

    _say(f"[1/4] generating the local mirror under {mirror_root}")
    for name, (run, hours) in plan.items():
        todo = [h for h in hours if not (mirror_root / (mirror_relative_path(name, run, h) + ".idx")).exists()]
        if not todo:
            _say(f"      {name} {run}: hours {hours[0]}-{hours[-1]} already generated")
            continue
        t0 = time.monotonic()
        generate_run(mirror_root, name, run, todo, progress=lambda m: _say(f"      {m}"))
        _say(f"      {name} {run}: {len(todo)} hours in {time.monotonic() - t0:.1f} s")

    instance = DagsterInstance.get()
    with MirrorServer(mirror_root) as server:
        _say(f"[2/4] mirror serving at {server.url}")
        env = {
            **os.environ,
            "WEATHER_PIPELINE_SOURCES": "mirror",
            "WEATHER_PIPELINE_MIRROR_URL": server.url,
            "WEATHER_PIPELINE_CACHE": str(cache_root),
            # Keep the GRIB subsets so they can be inspected; by default they are deleted once tiled.
            "WEATHER_PIPELINE_KEEP_GRIBS": "all",
        }
        resources = resources_from_env(env)
        _say(f"[3/4] materializing GRIB and tile assets through Dagster (instance: {os.environ['DAGSTER_HOME']})")
        run_ids: dict[str, list[str]] = {}
        for name, (run, hours) in plan.items():
            model = catalog.model(name)
            instance.add_dynamic_partitions(run_partitions(name).name, [run])
            assets = [build_grib_asset(model), build_tile_asset(model)]
            for group in contiguous_groups(hours, model.all_hours):
                t0 = time.monotonic()
                result = materialize(
                    assets,
                    instance=instance,
                    resources=resources,
                    # INFO shows the asset's per-hour progress lines without Dagster's DEBUG events.
                    run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
                    tags={
                        RANGE_START_TAG: str(partition_key(run, group[0])),
                        RANGE_END_TAG: str(partition_key(run, group[-1])),
                        "model": name,
                        "task": "ingest_grib",
                    },
                    raise_on_error=False,
                )
                status = "ok" if result.success else "FAILED"
                _say(f"      {name} {run} f{group[0]:03d}-f{group[-1]:03d}: run {result.run_id[:8]} {status} "
                     f"in {time.monotonic() - t0:.1f} s")
                run_ids.setdefault(name, []).append(result.run_id)
                if not result.success:
                    return 1

    _say("[4/4] summary (from the instance's materializations and the cache)")
    layout = CacheLayout(cache_root)
    _say(f"      {'model':6} {'run':12} {'hours':>5} {'files':>5} {'MB':>8} {'requests':>8}")
    for name, (run, hours) in plan.items():
        records = instance.fetch_materializations(AssetKey(grib_asset_name(name)), limit=10_000).records
        mine = [r for r in records if r.run_id in run_ids[name]]
        requests = sum(int(r.asset_materialization.metadata["requests"].value) for r in mine)
        files = [p for p in layout.grib_run_dir(name, run).rglob("grib_*.grib2")]
        size = sum(p.stat().st_size for p in files)
        _say(f"      {name:6} {run:12} {len(mine):>5} {len(files):>5} {size / 1e6:>8.2f} {requests:>8}")
    _say("      tiles written (hourly tile_HHH.npz + .meta.json per variable, and run tiles {variable}.npz):")
    for name, (run, hours) in plan.items():
        for region_dir in sorted(layout.tiles_root.glob(f"*/*/{name}/{run}")):
            hourly = sorted(region_dir.glob("*/tile_*.npz"))
            run_tiles = sorted(region_dir.glob("*.npz"))
            _say(f"      {region_dir.relative_to(workdir)}/: {len(hourly)} hourly tiles, run tiles: "
                 + ", ".join(p.name for p in run_tiles))
    _say(f"done in {time.monotonic() - t_start:.0f} s; GRIB subsets under {layout.gribs_root} (kept for the demo), "
         f"tiles under {layout.tiles_root}")
    _say("next: `make dev` opens the Dagster UI at http://127.0.0.1:3000 with these assets and partitions")
    return 0
