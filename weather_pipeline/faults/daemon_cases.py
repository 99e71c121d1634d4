"""The slow cases of the fault table: process faults on the production path (the Dagster daemon,
its code server, run workers, `dagster asset materialize`), against a mirror publishing a
current HRRR run. Every process is started here and stopped by its own id or process group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from weather_pipeline.core.cache import TEMP_PREFIX, sidecar_path
from weather_pipeline.core.catalog import format_run_key, load_catalog
from weather_pipeline.faults.harness import Case, Outcome, World
from weather_pipeline.mirror.generate import generate_run
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline.orchestration.local_daemon import BIN, start_daemon, stop_process_group, wait_for

REPO = Path(__file__).resolve().parents[2]
#: generous: a loaded 2-core machine; every wait ends as soon as its event happens
WAIT_S = 420


def _live_mirror(run: str, hours, into: Path) -> None:
    """A mirror of the current HRRR run at `into`: generated once per process and run, then
    hard-linked (generating costs about 4 s an hour; the cases need the same files)."""
    import atexit
    import tempfile

    root = Path(tempfile.gettempdir()) / f"weather-faults-live-{os.getpid()}"
    base = root / run
    todo = [h for h in hours if not (base / ".done" / str(h)).exists()]
    if todo:
        if not root.exists():
            atexit.register(shutil.rmtree, root, True)
        generate_run(base, "hrrr", run, todo)
        for h in todo:
            (base / ".done").mkdir(parents=True, exist_ok=True)
            (base / ".done" / str(h)).touch()
    from weather_pipeline.mirror.generate import mirror_relative_path

    for h in hours:
        for suffix in ("", ".idx"):
            rel = mirror_relative_path("hrrr", run, h) + suffix
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(base / rel, into / rel)


class Production:
    """A fresh Dagster instance (the repo's dagster.yaml), a mirror publishing a current HRRR run,
    and the daemon, as `make dev` would run them."""

    def __init__(self, world: World, hours=(0, 1, 2, 3)):
        import weather_pipeline  # noqa: F401

        self.world = world
        self.home = world.base / "home"
        self.home.mkdir()
        shutil.copy(REPO / "dagster.yaml", self.home / "dagster.yaml")
        self.mirror_root = world.base / "live-mirror"
        model = load_catalog().model("hrrr")
        self.run = format_run_key(model.latest_run_before(datetime.now(timezone.utc)))
        _live_mirror(self.run, list(hours), self.mirror_root)
        self.server = MirrorServer(self.mirror_root).start()
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "WEATHER_PIPELINE_SOURCES": "mirror",
                    "WEATHER_PIPELINE_MIRROR_URL": self.server.url, "WEATHER_PIPELINE_CACHE": str(world.cache.root),
                    "WEATHER_PIPELINE_SCAN_INTERVAL_S": "5", "WEATHER_PIPELINE_STATUS_INTERVAL_S": "10",
                    "WEATHER_PIPELINE_KEEP_GRIBS": "all", "WEATHER_PIPELINE_RATE_LIMIT_DB": str(world.base / "rl.sqlite")}
        self.daemons: list[subprocess.Popen] = []
        from dagster import DagsterInstance

        self.instance = DagsterInstance.from_config(str(self.home))

    def start_daemon(self, module: str = "weather_pipeline.definitions", **env) -> subprocess.Popen:
        proc = start_daemon({**self.env, **env}, self.world.base / f"daemon{len(self.daemons)}.log", module)
        self.daemons.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.daemons:
            stop_process_group(proc)
        self.server.stop()
        self.instance.dispose()

    # -- what the instance says -------------------------------------------------------------
    def materialized(self, asset: str) -> set[int]:
        from dagster import AssetKey

        from weather_pipeline.orchestration.partitions import parse_partition_key

        return {h for r, h in map(parse_partition_key, self.instance.get_materialized_partitions(AssetKey(asset)))
                if r == self.run}

    def started_run(self, job: str):
        from dagster import DagsterRunStatus, RunsFilter

        runs = self.instance.get_runs(RunsFilter(job_name=job, statuses=[DagsterRunStatus.STARTED]))
        return runs[0] if runs else None

    def idle(self) -> bool:
        """No run queued, starting or running."""
        from dagster import DagsterRunStatus, RunsFilter

        return not self.instance.get_runs(RunsFilter(statuses=[
            DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]))

    def done(self, asset: str, hours: set[int]) -> bool:
        return self.materialized(asset) == hours and self.idle()

    def worker_pid(self, run_id: str) -> int | None:
        for rec in self.instance.all_logs(run_id):
            if rec.message and rec.message.startswith("Started process for run (pid: "):
                return int(rec.message.split("pid: ")[1].rstrip(")."))
        return None

    def runs_summary(self, job: str) -> str:
        from dagster import RunsFilter

        runs = sorted(self.instance.get_runs(RunsFilter(job_name=job)), key=lambda r: r.run_id)
        return ", ".join(f"{r.status.value}{' (retry of ' + r.parent_run_id[:8] + ')' if r.parent_run_id else ''}"
                         for r in runs)

    def log_tail(self) -> str:
        logs = sorted(self.world.base.glob("daemon*.log"))
        return logs[-1].read_text()[-2000:] if logs else ""


def _broken_tiles(world: World) -> list[str]:
    bad = []
    for tile in world.cache.tiles_root.rglob("tile_*.npz"):
        try:
            with np.load(tile) as z:
                z["data"]
            if not sidecar_path(tile).is_file():
                bad.append(f"{tile}: no sidecar")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{tile}: {exc}")
    return bad


def kill_worker_mid_download(world: World) -> Outcome:
    p = Production(world)
    try:
        # hour 2's ranges answer after 6 s: the worker is killed while it waits for them
        p.server.faults.add("*wrfsfcf02.grib2", "delay", seconds=6, times=None)
        p.start_daemon()
        # hours are fetched concurrently: kill once hours 0 and 1 are recorded and hour 2 waits
        in_download = lambda: (p.started_run("hrrr_ingest_grib") is not None and  # noqa: E731
                               {0, 1} <= p.materialized("hrrr_grib") and p.server.in_flight > 0)
        if not wait_for(in_download, WAIT_S, 0.2):
            return Outcome(False, "the ingest never reached hour 2", p.log_tail()[-300:])
        run = p.started_run("hrrr_ingest_grib")
        pid = p.worker_pid(run.run_id)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        p.server.faults.clear()
        ok = wait_for(lambda: p.materialized("hrrr_grib") == {0, 1, 2, 3}, WAIT_S, 0.5)
        seconds = time.monotonic() - t0
        wait_for(p.idle, WAIT_S, 0.5)
        again = sum(1 for r in p.server.request_log if r.path.endswith("wrfsfcf00.grib2") and r.method == "GET")
        groups = 5  # hour 0's range requests: t2m, u10+v10 (adjacent), apcp, refc, mslp
        detail = f"ingest runs: {p.runs_summary('hrrr_ingest_grib')}; hour 0 ranges fetched {again}x"
        return Outcome(ok and again == groups, ("killed worker's run failed by Dagster, run retry fetched the "
                       "hours it lacked, kept the ones it had" if ok else "not recovered"), detail, seconds)
    finally:
        p.close()


def kill_worker_mid_tile_write(world: World) -> Outcome:
    p = Production(world)
    try:
        p.start_daemon()
        # the run writing tiles (the ingest run tiles each hour as it lands; a tile run would
        # too): kill its worker the moment an atomic tile write is in flight
        tiles = world.cache.tiles_root
        victim = None
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and victim is None:
            run = p.started_run("hrrr_ingest_grib") or p.started_run("hrrr_build_tile")
            if run is not None and tiles.exists():
                pid = p.worker_pid(run.run_id)
                for d, _dirs, files in os.walk(tiles):
                    if pid and f"{os.sep}hrrr{os.sep}" in d + os.sep and any(f.startswith(TEMP_PREFIX) for f in files):
                        os.kill(pid, signal.SIGKILL)
                        victim = (pid, d)
                        break
            if p.materialized("hrrr_tiles") == {0, 1, 2, 3}:
                break
            time.sleep(0.002)
        if victim is None:
            return Outcome(False, "no tile write was caught in flight", "the tile run finished first")
        t0 = time.monotonic()
        ok = wait_for(lambda: p.done("hrrr_tiles", {0, 1, 2, 3}), WAIT_S, 0.5)
        seconds = time.monotonic() - t0
        broken = _broken_tiles(world)
        temps = [str(x) for x in tiles.rglob(f"{TEMP_PREFIX}*")]
        detail = (f"ingest runs: {p.runs_summary('hrrr_ingest_grib')}; tile runs: {p.runs_summary('hrrr_build_tile')}; "
                  f"temp files after: {len(temps)}; "
                  f"tiles that do not load: {len(broken)}")
        return Outcome(ok and not broken and not temps,
                       "killed mid-write; run retried; the dead writer's temp files swept; every tile loads"
                       if ok else "not recovered", detail, seconds)
    finally:
        p.close()


def daemon_killed_and_restarted(world: World) -> Outcome:
    p = Production(world)
    try:
        p.server.faults.add("*wrfsfcf02.grib2", "delay", seconds=4, times=None)
        daemon = p.start_daemon()
        if not wait_for(lambda: p.started_run("hrrr_ingest_grib") is not None and
                        any(r.path.endswith("wrfsfcf01.grib2") for r in p.server.answered_so_far)
                        and p.server.in_flight > 0, WAIT_S, 0.2):
            return Outcome(False, "the ingest never started", p.log_tail()[-300:])
        t0 = time.monotonic()
        os.kill(daemon.pid, signal.SIGKILL)  # the daemon only: its code server and run worker live on
        time.sleep(3)
        p.start_daemon()
        ok = wait_for(lambda: p.done("hrrr_tiles", {0, 1, 2, 3}), WAIT_S, 0.5)
        seconds = time.monotonic() - t0
        return Outcome(ok, "the run in flight finished, tiles included" if ok
                       else "not recovered", f"ingest runs: {p.runs_summary('hrrr_ingest_grib')}; "
                       f"tile runs: {p.runs_summary('hrrr_build_tile')}", seconds)
    finally:
        p.close()


def slow_code_server(world: World) -> Outcome:
    p = Production(world, hours=(0,))
    try:
        marker = world.base / "slow-once"
        t0 = time.monotonic()
        p.start_daemon("weather_pipeline.faults.slow_location", WEATHER_PIPELINE_FAULT_SLOW_IMPORT_S="65",
                       WEATHER_PIPELINE_FAULT_SLOW_MARKER=str(marker))
        ok = wait_for(lambda: p.done("hrrr_tiles", {0}), WAIT_S, 0.5)
        seconds = time.monotonic() - t0
        slept = marker.exists()
        return Outcome(ok and slept, "waited for the code server (local_startup_timeout 300 s); the flow ran"
                       if ok else "the flow never ran", f"code server import took 65 s; first tile after {seconds:.0f} s"
                       if ok else p.log_tail()[-300:], seconds)
    finally:
        p.close()


def _cli_materialize(p: Production, hour: int, **kw) -> subprocess.Popen:
    from weather_pipeline.orchestration.partitions import partition_key

    return subprocess.Popen(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "weather_pipeline.definitions", "--select", "hrrr_grib",
         "--partition", str(partition_key(p.run, hour))],
        env=p.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def overlapping_cli_materializations(world: World) -> Outcome:
    p = Production(world, hours=(0,))
    try:
        p.instance.add_dynamic_partitions("hrrr_runs", [p.run])
        # the ranges of an hour are fetched concurrently: each answers after 8 s, so the first
        # is still writing when the second (started 1 s later, a few s to start up) arrives
        p.server.faults.add("*wrfsfcf00.grib2", "delay", seconds=8, times=None)
        t0 = time.monotonic()
        procs = [_cli_materialize(p, 0)]
        time.sleep(1.0)
        procs.append(_cli_materialize(p, 0))
        outs = [proc.communicate(timeout=WAIT_S)[0] for proc in procs]
        seconds = time.monotonic() - t0
        codes = [proc.returncode for proc in procs]
        gets = sum(1 for r in p.server.request_log if r.path.endswith("wrfsfcf00.grib2"))
        reused = sum("written meanwhile" in o or "committed by" in o for o in outs)
        ok = codes == [0, 0] and p.materialized("hrrr_grib") == {0} and gets == 5
        return Outcome(ok, "both succeeded; the second waited for the first and fetched nothing" if ok
                       else f"exit codes {codes}, {gets} range requests", f"exit codes {codes}; hour 0 ranges "
                       f"fetched {gets}x for two materializations", seconds)
    finally:
        p.close()


def sigterm_during_trickle(world: World) -> Outcome:
    p = Production(world, hours=(0,))
    try:
        p.instance.add_dynamic_partitions("hrrr_runs", [p.run])
        p.server.faults.add("*wrfsfcf00.grib2", "trickle", count=1, seconds=1.0, times=None)
        proc = _cli_materialize(p, 0)
        # the .idx has been answered and a GRIB range is trickling in
        stalled = lambda: (any(r.path.endswith("wrfsfcf00.grib2.idx") for r in p.server.answered_so_far)  # noqa: E731
                           and p.server.in_flight > 0)
        if not wait_for(lambda: stalled() or proc.poll() is not None, WAIT_S, 0.2) or proc.poll() is not None:
            return Outcome(False, "the download never started", "")
        time.sleep(2)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return Outcome(False, "ignored SIGTERM for a minute", "", time.monotonic() - t0)
        seconds = time.monotonic() - t0
        ok = proc.returncode != 0 and not world.cache.grib_paths_for_hour("hrrr", p.run, 0)
        last = next((line.split(" - RUN_FAILURE - ", 1)[1] for line in out.splitlines() if " - RUN_FAILURE - " in line),
                    out.strip().splitlines()[-1] if out.strip() else "")
        return Outcome(ok, f"stopped within {seconds:.1f} s of SIGTERM, nothing written" if ok else
                       f"exit {proc.returncode}", last, seconds, refused_hours=(("hrrr", p.run, 0),))
    finally:
        p.close()


DAEMON_CASES = [
    Case("worker killed mid-download", "kill -9 of the ingest run's worker while it waits for a GRIB range",
         kill_worker_mid_download, slow=True, seed=False),
    Case("worker killed mid-tile-write", "kill -9 of the worker of the run writing tiles while a tile's temp file exists",
         kill_worker_mid_tile_write, slow=True, seed=False),
    Case("daemon killed and restarted", "kill -9 of dagster-daemon during an ingest run, restarted 3 s later",
         daemon_killed_and_restarted, slow=True, seed=False),
    Case("code server slow to start", "the code location takes 65 s to import in the code server (Dagster's gRPC default: 60 s)",
         slow_code_server, slow=True, seed=False),
    Case("overlapping materializations", "two `dagster asset materialize` of one partition, 1 s apart",
         overlapping_cli_materializations, slow=True, seed=False),
    Case("SIGTERM during a stalled download", "SIGTERM to `dagster asset materialize` while its GRIB trickles",
         sigterm_during_trickle, slow=True, seed=False),
]
