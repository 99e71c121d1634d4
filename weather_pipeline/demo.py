"""`make demo`: the whole flow on embedded defaults against a generated local mirror.

1. generate a small NOAA-identical mirror (one recent HRRR and one recent GFS run, a few hours);
2. serve it on a free loopback port;
3. start the Dagster daemon on the project's instance ($DAGSTER_HOME) for as long as it takes:
   the ScanSource sensors find the runs, add their partitions and queue one ingest run per batch
   of hours; the queue launches them; the tiles-follow-GRIBs sensors queue the tile runs. This is
   the production path, not a hand-written loop;
4. print what landed, read back from the instance's materializations, and the tiles written.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import format_run_key, load_catalog
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline.orchestration.assets import grib_asset_name, tile_asset_name
from weather_pipeline.orchestration.local_daemon import dagster_daemon, wait_for
from weather_pipeline.core.status import summary_text
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.sensors import IN_FLIGHT
from weather_pipeline.orchestration.status import write_deep_status

#: how long the demo lets the daemon work before giving up
DEMO_TIMEOUT_S = 150


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_run_key(model_name: str, now: datetime) -> str:
    """The newest run at least an hour old: well inside the scanner's lookback, as a live run is."""
    return format_run_key(load_catalog().model(model_name).latest_run_before(now - timedelta(hours=1)))


def _materialized(instance: DagsterInstance, asset: str, keys: set[str]) -> set[str]:
    return keys & set(instance.get_materialized_partitions(AssetKey(asset)))


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
    wanted = {name: {str(partition_key(run, h)) for h in hours} for name, (run, hours) in plan.items()}
    with MirrorServer(mirror_root) as server:
        _say(f"[2/4] mirror serving at {server.url}")
        env = {
            **os.environ,
            "WEATHER_PIPELINE_SOURCES": "mirror",
            "WEATHER_PIPELINE_MIRROR_URL": server.url,
            "WEATHER_PIPELINE_CACHE": str(cache_root),
            # Keep the GRIB subsets so they can be inspected; by default they are deleted once tiled.
            "WEATHER_PIPELINE_KEEP_GRIBS": "all",
            "WEATHER_PIPELINE_SCAN_INTERVAL_S": "5",
            "WEATHER_PIPELINE_STATUS_INTERVAL_S": "5",
        }
        _say(f"[3/4] starting the Dagster daemon on {os.environ['DAGSTER_HOME']}: sensors scan the mirror, "
             "the run queue launches ingest and tile runs")
        log_path = Path(os.environ["DAGSTER_HOME"]) / "demo-daemon.log"
        last = [""]

        def progress() -> None:
            counts = {s.value: instance.get_runs_count(RunsFilter(statuses=[s], created_after=now))
                      for s in (DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
                                DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)}
            done = {name: (len(_materialized(instance, grib_asset_name(name), keys)),
                           len(_materialized(instance, tile_asset_name(name), keys)), len(keys))
                    for name, keys in wanted.items()}
            line = ("      runs: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items()) + " | "
                    + ", ".join(f"{n} gribs {g}/{t} tiles {ti}/{t}" for n, (g, ti, t) in done.items()))
            if line != last[0]:
                _say(line)
                last[0] = line

        def finished() -> bool:
            # every hour tiled, and no run still working (a tile run writes its run tiles after
            # recording its hours): the daemon is never stopped under a run of ours
            return (all(_materialized(instance, tile_asset_name(n), keys) == keys for n, keys in wanted.items())
                    and not instance.get_runs_count(RunsFilter(statuses=IN_FLIGHT, created_after=now)))

        with dagster_daemon(env, log_path=log_path):
            ok = wait_for(finished, timeout=DEMO_TIMEOUT_S, interval=2.0, on_wait=progress)
            progress()
        if not ok:
            _say(f"the daemon did not finish within {DEMO_TIMEOUT_S} s; see {log_path} and the runs in `make dev`")
            return 1

    _say("[4/4] summary (from the instance's materializations and the cache)")
    layout = CacheLayout(cache_root)
    _say(f"      {'model':6} {'run':12} {'hours':>5} {'files':>5} {'MB':>8} {'requests':>8}")
    for name, (run, hours) in plan.items():
        records = instance.fetch_materializations(AssetKey(grib_asset_name(name)), limit=10_000).records
        latest: dict[str, object] = {}
        for r in records:  # newest first: keep the latest materialization per partition
            if r.partition_key in wanted[name]:
                latest.setdefault(r.partition_key, r)
        requests = sum(int(r.asset_materialization.metadata["requests"].value) for r in latest.values())
        files = list(layout.grib_run_dir(name, run).rglob("grib_*.grib2"))
        size = sum(p.stat().st_size for p in files)
        _say(f"      {name:6} {run:12} {len(latest):>5} {len(files):>5} {size / 1e6:>8.2f} {requests:>8}")
    _say("      tiles written (hourly tile_HHH.npz + .meta.json per variable, and run tiles {variable}.npz):")
    for name, (run, hours) in plan.items():
        for region_dir in sorted(layout.tiles_root.glob(f"*/*/{name}/{run}")):
            hourly = sorted(region_dir.glob("*/tile_*.npz"))
            run_tiles = sorted(region_dir.glob("*.npz"))
            _say(f"      {region_dir.relative_to(workdir)}/: {len(hourly)} hourly tiles, run tiles: "
                 + ", ".join(p.name for p in run_tiles))
    _say("      deep status (weather-pipeline status; the daemon's deep_status sensor keeps "
         f"{layout.deep_status_path.relative_to(workdir)} current):")
    doc = write_deep_status(instance, layout)
    for line in summary_text(doc).splitlines():
        _say(f"        {line}")
    _say(f"done in {time.monotonic() - t_start:.0f} s; GRIB subsets under {layout.gribs_root} (kept for the demo), "
         f"tiles under {layout.tiles_root}")
    _say("next: `make dev` opens the Dagster UI at http://127.0.0.1:3000 with these assets, runs and sensors;")
    _say("      `make status-page` serves the status page at http://127.0.0.1:8766/status "
         "(the daemon has stopped, so it reports the daemon down until `make dev` runs)")
    return 0

