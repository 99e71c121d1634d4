"""`make demo`: the whole flow on embedded defaults against a generated local mirror.

1. generate a small NOAA-identical mirror (one recent HRRR and one recent GFS run, a few hours);
2. serve it on a free loopback port;
3. start the Dagster daemon on the project's instance ($DAGSTER_HOME) for as long as it takes:
   the ScanSource sensors find the runs, add their partitions and queue one ingest run per batch
   of hours; the queue launches them; the tiles-follow-GRIBs sensors queue the tile runs. This is
   the production path, not a hand-written loop;
4. print what landed, read back from the instance's materializations, and the tiles written.

Made to finish on a busy machine, and to converge when run again after a failure:
- its deadline (`--timeout`, default 15 min) starts when the daemon and its code server are
  ready (the deep_status sensor has written its first document), not before;
- it never stops the daemon under a run of its own: at the deadline it says so and waits for the
  runs in flight to finish;
- runs a previous demo left STARTED with their worker gone are marked failed first (they would
  otherwise hold their hours "in flight" for hours), and such failures, like any run that failed
  without its step failing, do not count toward ScanSource's give-up rule;
- the demo's models publish only the hours it generates (a catalog overlay written to
  $DAGSTER_HOME/demo-catalog.toml, which `make dev` uses too), so the deep status reads healthy
  once they are in.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import OVERLAY_ENV, format_run_key, load_catalog
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline.orchestration.assets import grib_asset_name, tile_asset_name
from weather_pipeline.orchestration.local_daemon import dagster_daemon, wait_for
from weather_pipeline.core.status import summary_text
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.sensors import IN_FLIGHT
from weather_pipeline.orchestration.status import write_deep_status

#: how long the demo lets the daemon work once it is ready (a loaded 2-core machine needs minutes)
DEMO_TIMEOUT_S = float(os.environ.get("WEATHER_PIPELINE_DEMO_TIMEOUT_S", "900"))
#: how long the daemon and its code server may take to come up
READY_TIMEOUT_S = 600.0
#: the catalog overlay that makes the demo's models publish just the demo's hours
DEMO_CATALOG = "demo-catalog.toml"


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_run_key(model_name: str, now: datetime) -> str:
    """The newest run at least an hour old: well inside the scanner's lookback, as a live run is."""
    return format_run_key(load_catalog().model(model_name).latest_run_before(now - timedelta(hours=1)))


def _materialized(instance: DagsterInstance, asset: str, keys: set[str]) -> set[str]:
    return keys & set(instance.get_materialized_partitions(AssetKey(asset)))


def demo_catalog_overlay(plan: dict[str, tuple[str, list[int]]]) -> str:
    """A catalog overlay in which each demo model's runs have exactly the demo's hours."""
    catalog = load_catalog()
    lines = ["# Written by `weather-pipeline demo`: the demo's mirror publishes these forecast hours of",
             "# every run, so a run is complete once they are in. `make dev` loads it too.", ""]
    for name, (_run, hours) in plan.items():
        model = catalog.model(name)
        lines += [f"[models.{name}]", "horizons = [{run_hours = \"%s\", forecast_hours = \"%s\"}]"
                  % (",".join(map(str, model.run_hours)), ",".join(map(str, sorted(hours)))), ""]
    return "\n".join(lines)


def _worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    for rec in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        if rec.message and rec.message.startswith("Started process for run (pid: "):
            return int(rec.message.split("pid: ")[1].rstrip(")."))
    return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_abandoned_runs(instance: DagsterInstance) -> list[str]:
    """Mark failed the runs left STARTING/STARTED/CANCELING whose worker process is gone.

    Called only when no daemon serves the instance: then nothing will ever finish them, and
    ScanSource would see their hours as in flight for hours (until run monitoring's max runtime).
    """
    released = []
    stuck = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    for run in instance.get_runs(RunsFilter(statuses=stuck)):
        if _alive(_worker_pid(instance, run.run_id)):
            continue
        instance.report_engine_event("the run's worker is gone (a stopped demo or daemon): marked failed by "
                                     "`weather-pipeline demo` so its hours can be fetched again", run)
        instance.report_run_failed(run)
        released.append(run.run_id)
    return released


#: Dagster daemons write a heartbeat every 30 s
HEARTBEAT_INTERVAL_S = 30.0


#: when the last demo stopped its daemon (so its lingering heartbeat is not taken for a live one)
STOPPED_MARK = "demo-daemon.stopped"


def _daemon_serving(instance: DagsterInstance, home: Path) -> bool:
    """Whether another daemon serves the instance: a heartbeat newer than the last one we saw
    appears within one heartbeat interval (a stopped daemon's last beat lingers for a while)."""
    def newest() -> float | None:
        return max((b.timestamp for b in instance.get_daemon_heartbeats().values()), default=None)

    seen = newest()
    if seen is None or time.time() - seen > 2 * HEARTBEAT_INTERVAL_S:
        return False
    try:
        if seen <= float((home / STOPPED_MARK).read_text()) + 1:
            return False  # the last beat is the one of the daemon the previous demo stopped
    except (OSError, ValueError):
        pass
    _say(f"      a daemon beat {time.time() - seen:.0f} s ago; checking it has stopped (up to {HEARTBEAT_INTERVAL_S + 5:.0f} s)")
    return wait_for(lambda: (newest() or 0) > seen, timeout=HEARTBEAT_INTERVAL_S + 5, interval=1.0)


def run_demo(workdir: Path, hrrr_hours: Sequence[int], gfs_hours: Sequence[int], *,
             timeout_s: float = DEMO_TIMEOUT_S) -> int:
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
    home = Path(os.environ["DAGSTER_HOME"])
    overlay = home / DEMO_CATALOG
    overlay.write_text(demo_catalog_overlay(plan))
    os.environ[OVERLAY_ENV] = str(overlay)  # this process's own reads (summary, status) agree
    os.environ["WEATHER_PIPELINE_STATUS_INTERVAL_S"] = "5"  # as the demo's daemon writes deep.json

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
    if _daemon_serving(instance, home):
        print(f"weather-pipeline demo: a Dagster daemon is already serving {home} (is `make dev` running?); "
              "stop it first, or watch it work in the UI", file=sys.stderr)
        return 2
    released = release_abandoned_runs(instance)
    if released:
        _say(f"      {len(released)} runs left running by an earlier, stopped demo were marked failed: "
             "their hours are fetched again (such failures never count as failed attempts)")
    wanted = {name: {str(partition_key(run, h)) for h in hours} for name, (run, hours) in plan.items()}
    with MirrorServer(mirror_root) as server:
        _say(f"[2/4] mirror serving at {server.url}")
        env = {
            **os.environ,
            OVERLAY_ENV: str(overlay),
            "WEATHER_PIPELINE_SOURCES": "mirror",
            "WEATHER_PIPELINE_MIRROR_URL": server.url,
            "WEATHER_PIPELINE_CACHE": str(cache_root),
            # Keep the GRIB subsets so they can be inspected; by default they are deleted once tiled.
            "WEATHER_PIPELINE_KEEP_GRIBS": "all",
            "WEATHER_PIPELINE_SCAN_INTERVAL_S": "5",
            "WEATHER_PIPELINE_STATUS_INTERVAL_S": "5",
        }
        _say(f"[3/4] starting the Dagster daemon on {home}: sensors scan the mirror, "
             "the run queue launches ingest and tile runs")
        log_path = home / "demo-daemon.log"
        layout = CacheLayout(cache_root)
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

        def in_flight() -> int:
            return instance.get_runs_count(RunsFilter(statuses=IN_FLIGHT, created_after=now))

        def finished() -> bool:
            # every hour tiled, and no run still working (a tile run writes its run tiles after
            # recording its hours): the daemon is never stopped under a run of ours
            return (all(_materialized(instance, tile_asset_name(n), keys) == keys for n, keys in wanted.items())
                    and not in_flight())

        def ready() -> bool:
            # the deep_status sensor has written since we started: the daemon runs, its code
            # server has loaded the code location, and sensors are being evaluated
            try:
                return layout.deep_status_path.stat().st_mtime >= started_at
            except FileNotFoundError:
                return False

        started_at = time.time()
        layout.deep_status_path.unlink(missing_ok=True)
        with dagster_daemon(env, log_path=log_path):
            t_ready = time.monotonic()
            if not wait_for(ready, timeout=READY_TIMEOUT_S, interval=1.0):
                _say(f"the daemon and its code server did not come up within {READY_TIMEOUT_S:.0f} s; see {log_path}")
                return 1
            _say(f"      daemon and code server ready after {time.monotonic() - t_ready:.0f} s; "
                 f"waiting up to {timeout_s:.0f} s for the flow (--timeout)")
            ok = wait_for(finished, timeout=timeout_s, interval=2.0, on_wait=progress)
            if not ok and in_flight():
                _say(f"      not done within {timeout_s:.0f} s; waiting for the {in_flight()} runs in flight to finish "
                     "before stopping the daemon, so none is killed (Ctrl-C leaves them for the next `make demo`)")
                wait_for(lambda: not in_flight(), timeout=max(timeout_s, 600.0), interval=2.0, on_wait=progress)
                ok = finished()
            progress()
            # the last document, written while the daemon still runs (so it says so truthfully),
            # with the demo sensor's interval: once the demo ends, it goes stale within 15 s
            final_doc = write_deep_status(instance, layout) if ok else None
        (home / STOPPED_MARK).write_text(f"{time.time():.3f}\n")
        if not ok:
            _say(f"the flow did not finish within {timeout_s:.0f} s of the daemon being ready; see {log_path} and "
                 "the runs in `make dev`. Running `make demo` again continues where this one stopped.")
            return 1

    _say("[4/4] summary (from the instance's materializations and the cache)")
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
    for line in summary_text(final_doc).splitlines():
        _say(f"        {line}")
    _say(f"done in {time.monotonic() - t_start:.0f} s; GRIB subsets under {layout.gribs_root} (kept for the demo), "
         f"tiles under {layout.tiles_root}")
    _say("next: `make dev` opens the Dagster UI at http://127.0.0.1:3000 with these assets, runs and sensors;")
    _say("      `make status-page` serves the status page at http://127.0.0.1:8766/status "
         "(the daemon has stopped, so it says the daemon is not writing until `make dev` runs)")
    return 0

