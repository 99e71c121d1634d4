"""Automation through the real Dagster daemon: freshness, and the cost of orchestration.

1. **Freshness.** A 19-hour HRRR run (a run hour other than 00/06/12/18z) is generated into a
   staging directory first, outside the clock; with the mirror served and the daemon running on a
   fresh instance (a temp DAGSTER_HOME with a copy of the repo's `dagster.yaml`), the hours are
   then *published* one at a time at a fixed cadence, by renaming the GRIB and then its `.idx`
   into the served tree, as NOAA's hours appear. Freshness of an hour = mtime of its
   `conus/0.05deg/.../t2m/tile_HHH.npz` minus the mtime of its `.idx` (set to the moment of the
   rename). Staging keeps the generator's CPU (about 3 s per HRRR hour on 2 cores) out of the
   pipeline's way. Each hour's delay is split at the points the instance records (run creation,
   dequeue, step start, materializations).
2. **Orchestration overhead.** A 49-hour HRRR run (00/06/12/18z) is generated into a second
   mirror; the daemon is started on another fresh instance and timed until every hour's tile
   partition is materialized (timestamp of the last tile materialization event minus the moment
   the daemon process was started). The same work is then done in this process without Dagster
   (`ingest_hour`, `build_hour` and `retire_gribs` per hour, then `update_run_tile` for every
   region/resolution/variable) against the same mirror server, into a separate cache.

Everything lives under one temporary directory; the daemon (and every run worker it launched)
is stopped by process group when each part ends.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing import get_context
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable

import weather_pipeline  # noqa: F401  (pyproj before eccodes)
import numpy as np
from dagster import AssetKey, DagsterEventType, DagsterInstance, RunsFilter

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import format_run_key, load_catalog
from weather_pipeline.core.ingest import ingest_hour
from weather_pipeline.core.tiles import build_hour, retire_gribs, update_run_tile
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline.orchestration.assets import grib_asset_name, tile_asset_name
from weather_pipeline.orchestration.jobs import TASK_TAG
from weather_pipeline.orchestration.local_daemon import dagster_daemon, wait_for
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline.orchestration.sensors import IN_FLIGHT, hours_in_range_tags

MODEL = "hrrr"
#: the scan sensor's minimum interval for this benchmark (production default: 60 s)
SCAN_INTERVAL_S = 15
#: the tiles sensor's minimum interval (sensors.py); the daemon evaluates sensors every 5 s
TILES_INTERVAL_S = 5
#: seconds between two published hours: not a multiple of the scan interval, so that the hours
#: appear at every phase of the sensor's tick (NOAA's HRRR hours land minutes apart)
CADENCE_S = 17
FRESH_HOURS = 19
OVERHEAD_HOURS = 49
#: the tile whose appearance defines freshness
REGION, RES, VARIABLE = "conus", 0.05, "t2m"
#: the 49-hour run can be almost 6 h old, the scanner's default lookback; part 2 widens it
OVERHEAD_LOOKBACK_H = 12
TARGETS = {"freshness_slack_s": 20.0, "overhead_ratio": 1.5}
FRESH_TIMEOUT_S = 420
OVERHEAD_TIMEOUT_S = 1200
#: free disk needed for part 2 (49 generated HRRR hours are about 4 GB)
DISK_NEEDED = 6e9
REPO_DAGSTER_YAML = Path(weather_pipeline.__file__).resolve().parents[1] / "dagster.yaml"

Say = Callable[[str], None]


# -- set-up helpers ------------------------------------------------------------------------


def _home(path: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copy(REPO_DAGSTER_YAML, path / "dagster.yaml")
    return path


def _env(home: Path, url: str, cache: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """The daemon's environment: ours, minus any WEATHER_PIPELINE_* the caller had set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEATHER_PIPELINE_")}
    env.update({
        "DAGSTER_HOME": str(home),
        "WEATHER_PIPELINE_SOURCES": "mirror",
        "WEATHER_PIPELINE_MIRROR_URL": url,
        "WEATHER_PIPELINE_CACHE": str(cache),
        "WEATHER_PIPELINE_SCAN_INTERVAL_S": str(SCAN_INTERVAL_S),
        # the machine-wide rate-limit bucket: keep ours apart from anyone else's processes
        "WEATHER_PIPELINE_RATE_LIMIT_DB": str(tmp / "ratelimit.sqlite"),
        **extra,
    })
    return env


def _open_instance(home: Path) -> DagsterInstance:
    instance = DagsterInstance.from_config(str(home))
    instance.get_runs_count()  # create the storage here, before the daemon opens it too
    return instance


def _run_with_hours(hours: int, now: datetime) -> str:
    """The newest HRRR run at or before `now` with this many forecast hours."""
    model = load_catalog().model(MODEL)
    t = model.latest_run_before(now)
    while len(model.hours_for_run(t)) != hours:
        t -= timedelta(hours=1)
    return format_run_key(t)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no daemon log: {exc})"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _ts(dt: datetime | float | None) -> float | None:
    if dt is None:
        return None
    if isinstance(dt, datetime):
        # the run storage hands back naive UTC datetimes
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    return float(dt)


class OtherLoad:
    """CPU used by processes outside this benchmark's process tree (this process, the daemon and
    every run worker it starts), in cores on average, sampled from /proc while active. Other
    people's work on a shared machine slows process start-ups first; this says how much there was.
    CPU of a process that ends between two samples is partly missed: a lower bound."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.core_seconds = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    @property
    def cores(self) -> float:
        return self.core_seconds / self.seconds if self.seconds else 0.0

    def _sample(self) -> dict[int, int]:
        procs: dict[int, tuple[int, int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as fh:
                    text = fh.read()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            procs[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        mine, todo = set(), [os.getpid()]
        while todo:
            pid = todo.pop()
            mine.add(pid)
            todo += children.get(pid, [])
        return {pid: cpu for pid, (_, cpu) in procs.items() if pid not in mine}

    def _loop(self) -> None:
        prev, t_prev = self._sample(), time.monotonic()
        while not self._stop.wait(self.interval):
            cur, now = self._sample(), time.monotonic()
            self.core_seconds += sum(cpu - prev.get(pid, 0) for pid, cpu in cur.items() if cpu >= prev.get(pid, 0)) / self._tick
            self.seconds += now - t_prev
            prev, t_prev = cur, now

    def __enter__(self) -> "OtherLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- reading the instance --------------------------------------------------------------------


@dataclass
class RunInfo:
    run_id: str
    job: str
    task: str
    status: str
    hours: list[int]
    created: float
    events: dict[str, float] = field(default_factory=dict)  # first timestamp per event type
    retried_from: str | None = None
    #: when the step's loop over the hours ended: its last "[n/n] ..." log line (None if absent)
    loop_end: float | None = None

    def at(self, name: str) -> float | None:
        return self.events.get(name)

    def span(self, a: str, b: str) -> float | None:
        x, y = self.at(a), self.at(b)
        return None if x is None or y is None else y - x


# Dagster 1.13 records no RUN_DEQUEUED event: the queue's dequeue is the run's RUN_STARTING.
_EVENTS = {
    DagsterEventType.RUN_ENQUEUED: "enqueued", DagsterEventType.RUN_STARTING: "starting",
    DagsterEventType.RUN_START: "start", DagsterEventType.STEP_WORKER_STARTING: "worker_starting",
    DagsterEventType.STEP_START: "step_start", DagsterEventType.STEP_SUCCESS: "step_success",
    DagsterEventType.STEP_FAILURE: "step_failure", DagsterEventType.STEP_UP_FOR_RETRY: "step_retry",
    DagsterEventType.RUN_SUCCESS: "end", DagsterEventType.RUN_FAILURE: "end", DagsterEventType.RUN_CANCELED: "end",
}


#: the assets log "[i/n] model run fHHH: ..." after each hour
_LOOP_LINE = re.compile(r"^\[(\d+)/(\d+)\] ")


def _runs(instance: DagsterInstance) -> list[RunInfo]:
    model = load_catalog().model(MODEL)
    out = []
    for rec in instance.get_run_records(RunsFilter(), ascending=True):
        run = rec.dagster_run
        info = RunInfo(run.run_id, run.job_name, run.tags.get(TASK_TAG, "?"), run.status.value,
                       hours_in_range_tags(run.tags, model), _ts(rec.create_timestamp),
                       retried_from=run.tags.get("dagster/parent_run_id"))
        for entry in instance.all_logs(run.run_id):
            ev = entry.dagster_event
            if ev is not None and ev.event_type in _EVENTS:
                info.events.setdefault(_EVENTS[ev.event_type], entry.timestamp)
            elif ev is None and (m := _LOOP_LINE.match(entry.user_message or "")) and m[1] == m[2]:
                info.loop_end = entry.timestamp
        out.append(info)
    return out


def _materializations(instance: DagsterInstance, asset: str) -> dict[str, list[tuple[float, str]]]:
    """partition key -> [(timestamp, run id)], oldest first."""
    by_key: dict[str, list[tuple[float, str]]] = {}
    for rec in instance.fetch_materializations(AssetKey(asset), limit=10_000, ascending=True).records:
        by_key.setdefault(rec.partition_key, []).append((rec.timestamp, rec.run_id))
    return by_key


def _sensor_ticks(instance: DagsterInstance) -> dict[str, dict]:
    """Per sensor of MODEL: tick start times (oldest first), evaluation durations, and the tick
    start of every run it requested (run id -> tick start)."""
    out: dict[str, dict] = {}
    for state in instance.all_instigator_state():
        name = state.instigator_name
        if not name.startswith(f"{MODEL}_"):
            continue
        ticks = sorted(instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=5000),
                       key=lambda t: t.timestamp)
        out[name] = {
            "starts": [t.timestamp for t in ticks],
            "durations": [t.end_timestamp - t.timestamp for t in ticks if t.end_timestamp],
            "by_run": {rid: t.timestamp for t in ticks for rid in t.run_ids},
        }
    return out


def _tick_lines(ticks: dict[str, dict]) -> list[str]:
    lines = []
    for name, nominal in ((f"{MODEL}_scan_source", SCAN_INTERVAL_S), (f"{MODEL}_tiles_follow_gribs", TILES_INTERVAL_S)):
        t = ticks.get(name)
        if not t or len(t["starts"]) < 2:
            continue
        gaps = np.diff(t["starts"]).tolist()
        lines.append(
            f"| `{name}` ticks (minimum interval {nominal} s): {len(t['starts'])}, interval p50 / max | "
            f"{_pct(gaps, 50):.1f} s / {max(gaps):.1f} s (evaluation p50 {_pct(t['durations'], 50):.2f} s) |")
    return lines


def _done(instance: DagsterInstance, asset: str, keys: set[str]) -> set[str]:
    return keys & set(instance.get_materialized_partitions(AssetKey(asset)))


def _progress(instance: DagsterInstance, keys: set[str], say: Say, last: list[str], t0: float) -> None:
    runs = instance.get_run_records(RunsFilter())
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.dagster_run.status.value.lower()] = counts.get(r.dagster_run.status.value.lower(), 0) + 1
    line = (f"runs {dict(sorted(counts.items()))}, gribs {len(_done(instance, grib_asset_name(MODEL), keys))}"
            f"/{len(keys)}, tiles {len(_done(instance, tile_asset_name(MODEL), keys))}/{len(keys)}")
    if line != last[0]:
        say(f"    +{time.time() - t0:5.0f} s {line}")
        last[0] = line


def _orchestration_health(runs: list[RunInfo], gribs: dict, tiles: dict, keys: set[str], t0: float,
                          origin: str) -> dict:
    """Run counts, failures, retries, duplicates; `t0` is the origin of the `created` times shown."""
    return {
        "ingest_runs": sum(r.task == "ingest_grib" for r in runs),
        "tile_runs": sum(r.task == "build_tile" for r in runs),
        "other_runs": [f"`{r.job}` ({r.status}, created {r.created - t0:.0f} s)" for r in runs
                       if r.task not in ("ingest_grib", "build_tile")],
        "step_s": {task: [r.span("step_start", "step_success") for r in runs
                          if r.task == task and r.span("step_start", "step_success") is not None]
                   for task in ("ingest_grib", "build_tile")},
        "failed": [f"{r.job} {r.hours[:1]}..{r.hours[-1:]} ({r.status})" for r in runs
                   if r.status not in ("SUCCESS",)],
        "retries": sum(r.retried_from is not None for r in runs),
        "step_retries": sum("step_retry" in r.events for r in runs),
        "dup_gribs": {k: len(v) for k, v in gribs.items() if k in keys and len(v) > 1},
        "dup_tiles": {k: len(v) for k, v in tiles.items() if k in keys and len(v) > 1},
        "hours_per_ingest_run": [len(r.hours) for r in runs if r.task == "ingest_grib"],
        "hours_per_tile_run": [len(r.hours) for r in runs if r.task == "build_tile"],
    }


def _health_lines(h: dict) -> list[str]:
    dup = "none" if not (h["dup_gribs"] or h["dup_tiles"]) else (
        f"GRIB {h['dup_gribs'] or 'none'}, tiles {h['dup_tiles'] or 'none'}")
    return [
        f"| Dagster runs | {h['ingest_runs']} `{MODEL}_ingest_grib` (hours per run: "
        f"{', '.join(map(str, h['hours_per_ingest_run'])) or '-'}), {h['tile_runs']} `{MODEL}_build_tile` "
        f"(hours per run: {', '.join(map(str, h['hours_per_tile_run'])) or '-'})"
        + (f", other: {', '.join(h['other_runs'])}" if h["other_runs"] else "") + " |",
        f"| runs not successful | {', '.join(h['failed']) or 'none'} |",
        f"| run retries (re-executions) / step retries | {h['retries']} / {h['step_retries']} |",
        f"| partitions materialized more than once | {dup} |",
        "| step duration p50 / max: ingest, tile | " + ", ".join(
            f"{_pct(v, 50):.1f} / {max(v):.1f} s" if v else "-" for v in h["step_s"].values()) + " |",
    ]


# -- part 1: freshness -----------------------------------------------------------------------


def _publish(staging: Path, served: Path, run: str, hour: int) -> float:
    """Move one generated hour into the served tree, GRIB first, then its `.idx`; the `.idx`
    gets the moment of its rename as mtime. Returns that moment."""
    rel = mirror_relative_path(MODEL, run, hour)
    src, dst = staging / rel, served / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    idx_src, idx_dst = src.with_name(src.name + ".idx"), dst.with_name(dst.name + ".idx")
    now = time.time()
    os.utime(idx_src, (now, now))
    os.replace(idx_src, idx_dst)
    return idx_dst.stat().st_mtime


def _freshness(tmp: Path, say: Say) -> dict:
    run = _run_with_hours(FRESH_HOURS, datetime.now(timezone.utc))
    hours = list(range(FRESH_HOURS))
    staging, served, cache_root = tmp / "staging1", tmp / "mirror1", tmp / "cache1"
    served.mkdir()
    layout = CacheLayout(cache_root)
    say(f"  [freshness] generating {MODEL} {run} f000-f{hours[-1]:03d} into a staging directory")
    t0 = time.monotonic()
    generate_run(staging, MODEL, run, hours)
    gen_s = time.monotonic() - t0
    keys = {str(partition_key(run, h)): h for h in hours}
    home, log_path = _home(tmp / "home1"), tmp / "daemon1.log"
    published: dict[int, float] = {}
    result: dict = {"run": run, "generate_s": gen_s, "log_path": log_path}
    with MirrorServer(served) as server, _open_instance(home) as instance:
        env = _env(home, server.url, cache_root, tmp)
        t_start = time.time()
        with OtherLoad() as other, dagster_daemon(env, log_path=log_path) as proc:
            avail = layout.source_availability_path(MODEL)
            if not wait_for(avail.exists, timeout=180, interval=0.5):
                result["error"] = "the scan sensor never ticked (no source availability file after 180 s)"
                result["log_tail"] = _log_tail(log_path)
                return result
            result["first_tick_s"] = time.time() - t_start
            say(f"  [freshness] daemon up, first scan tick {result['first_tick_s']:.0f} s after start; publishing "
                f"one hour every {CADENCE_S} s")
            last = [""]
            t_pub0 = time.monotonic()
            for h in hours:
                delay = t_pub0 + h * CADENCE_S - time.monotonic()
                while delay > 0:
                    time.sleep(min(delay, 2.0))
                    _progress(instance, set(keys), say, last, t_start)
                    delay = t_pub0 + h * CADENCE_S - time.monotonic()
                published[h] = _publish(staging, served, run, h)
            ok = wait_for(lambda: _done(instance, tile_asset_name(MODEL), set(keys)) == set(keys),
                          timeout=FRESH_TIMEOUT_S, interval=1.0,
                          on_wait=lambda: _progress(instance, set(keys), say, last, t_start))
            # let anything still queued or running finish, so the run counts are final
            wait_for(lambda: not instance.get_runs_count(RunsFilter(statuses=IN_FLIGHT)), timeout=90, interval=1.0)
            _progress(instance, set(keys), say, last, t_start)
            result["daemon_alive"] = proc.poll() is None
        result["other_cores"] = other.cores
        result["log_tail"] = _log_tail(log_path)
        runs = _runs(instance)
        gribs = _materializations(instance, grib_asset_name(MODEL))
        tiles = _materializations(instance, tile_asset_name(MODEL))
        ticks = _sensor_ticks(instance)
    if not ok:
        result["error"] = f"not every tile partition was materialized {FRESH_TIMEOUT_S} s after the last hour"
    by_id = {r.run_id: r for r in runs}
    tick_of = {**ticks.get(f"{MODEL}_scan_source", {}).get("by_run", {}),
               **ticks.get(f"{MODEL}_tiles_follow_gribs", {}).get("by_run", {})}
    rows = []
    for h in hours:
        key = str(partition_key(run, h))
        tile = layout.tile_path(REGION, RES, MODEL, run, VARIABLE, h)
        if not tile.is_file() or key not in gribs or key not in tiles:
            rows.append({"hour": h, "missing": True})
            continue
        g_ts, g_run = gribs[key][0]
        t_ts, t_run = tiles[key][0]
        ing, til = by_id[g_run], by_id[t_run]
        hour_tiles = list(layout.tiles_root.glob(f"*/*/{MODEL}/{run}/*/tile_{h:03d}.npz"))
        pub, tile_t = published[h], tile.stat().st_mtime
        # the points each hour passes, in order; consecutive differences are the stages
        points = [
            ("published", pub),
            ("scan tick", tick_of.get(ing.run_id, ing.created)),
            ("ingest enqueued", ing.at("enqueued") or ing.created),
            ("ingest starting", ing.at("starting")),
            ("ingest run start", ing.at("start")),
            ("ingest step start", ing.at("step_start")),
            ("GRIB materialized", g_ts),
            ("tiles tick", tick_of.get(til.run_id, til.created)),
            ("tile enqueued", til.at("enqueued") or til.created),
            ("tile starting", til.at("starting")),
            ("tile run start", til.at("start")),
            ("tile step start", til.at("step_start")),
            ("tile written", tile_t),
        ]
        stages = {STAGES[i][0]: points[i + 1][1] - points[i][1] for i in range(len(STAGES))}
        rows.append({
            "hour": h, "missing": False, "published": pub - published[0], "fresh": tile_t - pub,
            "all_tiles": max(p.stat().st_mtime for p in hour_tiles) - pub, "n_tiles": len(hour_tiles),
            "materialized": t_ts - pub, "ingest_hours": len(ing.hours), "tile_hours": len(til.hours),
            **stages,
        })
    result["ticks"] = ticks
    result.update(rows=rows, runs=runs, health=_orchestration_health(runs, gribs, tiles, set(keys), published[0],
                                                                   "the first hour was published"))
    return result


# -- part 2: orchestration overhead ----------------------------------------------------------


def _generate_part(args: tuple[str, str, list[int]]) -> int:
    root, run, hours = args
    generate_run(Path(root), MODEL, run, hours)
    return len(hours)


def _generate_parallel(root: Path, run: str, hours: list[int]) -> None:
    """Both cores: even and odd hours in two forked processes (output is deterministic per hour)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("fork")) as pool:
        list(pool.map(_generate_part, [(str(root), run, hours[0::2]), (str(root), run, hours[1::2])]))


def _baseline(url: str, run: str, hours: list[int], cache_root: Path, tmp: Path) -> dict:
    """The same work in this process, no Dagster: the assets' own calls, in order."""
    env = _env(tmp / "unused-home", url, cache_root, tmp)
    noaa = resources_from_env(env)["noaa"]
    layout = CacheLayout(cache_root)
    t = {"ingest": 0.0, "build": 0.0, "retire": 0.0, "run_tiles": 0.0}
    touched = set()
    clock = time.perf_counter
    start = clock()
    with noaa.client() as client:
        for h in hours:
            s = clock()
            ingest_hour(MODEL, run, h, cache=layout, client=client, settings=noaa.source_settings(),
                        allow_full_download=noaa.allow_full_download)
            t["ingest"] += clock() - s
            s = clock()
            report = build_hour(MODEL, run, h, layout)
            t["build"] += clock() - s
            s = clock()
            retire_gribs(layout, report)
            t["retire"] += clock() - s
            touched |= {(r.region, r.res, r.variable) for r in report.results}
    s = clock()
    for region, res, variable in sorted(touched):
        update_run_tile(layout, region, res, MODEL, run, variable)
    t["run_tiles"] = clock() - s
    t["total"] = clock() - start
    t["run_tile_sets"] = len(touched)
    t["tiles"] = len(list(layout.tiles_root.glob(f"*/*/{MODEL}/{run}/*/tile_*.npz")))
    return t


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _overhead(tmp: Path, say: Say) -> dict:
    run = _run_with_hours(OVERHEAD_HOURS, datetime.now(timezone.utc))
    hours = list(range(OVERHEAD_HOURS))
    result: dict = {"run": run}
    free = shutil.disk_usage(tmp).free
    if free < DISK_NEEDED:
        result["error"] = (f"skipped: {free / 1e9:.1f} GB free under {tmp}, the 49-hour mirror needs about "
                           f"{DISK_NEEDED / 1e9:.0f} GB")
        return result
    mirror, cache_daemon, cache_base = tmp / "mirror2", tmp / "cache2", tmp / "cache3"
    say(f"  [overhead] generating {MODEL} {run} f000-f{hours[-1]:03d} (two processes)")
    t0 = time.monotonic()
    _generate_parallel(mirror, run, hours)
    result["generate_s"] = time.monotonic() - t0
    result["mirror_bytes"] = sum(p.stat().st_size for p in mirror.rglob("*") if p.is_file())
    say(f"  [overhead] {result['mirror_bytes'] / 1e9:.1f} GB in {result['generate_s']:.0f} s")
    overlay = tmp / "overlay.toml"
    overlay.write_text(f"[models.{MODEL}]\nscan_lookback_hours = {OVERHEAD_LOOKBACK_H}\n")
    keys = {str(partition_key(run, h)) for h in hours}
    home, log_path = _home(tmp / "home2"), tmp / "daemon2.log"
    result["log_path"] = log_path
    try:
        with MirrorServer(mirror) as server:
            with _open_instance(home) as instance:
                env = _env(home, server.url, cache_daemon, tmp, WEATHER_PIPELINE_CATALOG=str(overlay))
                last = [""]
                say("  [overhead] starting the daemon")
                t_start = time.time()
                with OtherLoad() as other, dagster_daemon(env, log_path=log_path) as proc:
                    ok = wait_for(lambda: _done(instance, tile_asset_name(MODEL), keys) == keys,
                                  timeout=OVERHEAD_TIMEOUT_S, interval=1.0,
                                  on_wait=lambda: _progress(instance, keys, say, last, t_start))
                    t_seen = time.time()
                    wait_for(lambda: not instance.get_runs_count(RunsFilter(statuses=IN_FLIGHT)), timeout=90,
                             interval=1.0)
                    _progress(instance, keys, say, last, t_start)
                    result["daemon_alive"] = proc.poll() is None
                result["other_cores"] = other.cores
                result["log_tail"] = _log_tail(log_path)
                runs = _runs(instance)
                gribs = _materializations(instance, grib_asset_name(MODEL))
                tiles = _materializations(instance, tile_asset_name(MODEL))
                result["ticks"] = _sensor_ticks(instance)
            if not ok:
                result["error"] = f"not every tile partition was materialized within {OVERHEAD_TIMEOUT_S} s"
                return result
            t_end = max(v[0][0] for k, v in tiles.items() if k in keys)
            result.update(daemon_s=t_end - t_start, poll_s=t_seen - t_start, t_start=t_start, t_end=t_end,
                          runs=runs, health=_orchestration_health(runs, gribs, tiles, keys, t_start, "the daemon started"),
                          daemon_tiles=len(list(CacheLayout(cache_daemon).tiles_root.glob(
                              f"*/*/{MODEL}/{run}/*/tile_*.npz"))))
            say(f"  [overhead] daemon: {result['daemon_s']:.1f} s; now the same work in-process")
            with OtherLoad() as other:
                result["baseline"] = _baseline(server.url, run, hours, cache_base, tmp)
            result["baseline_other_cores"] = other.cores
            say(f"  [overhead] in-process: {result['baseline']['total']:.1f} s")
    finally:
        shutil.rmtree(mirror, ignore_errors=True)  # ~4 GB: do not wait for the temp dir's cleanup
    return result


# -- the report ------------------------------------------------------------------------------


def run(say: Say = print) -> str:
    started = time.monotonic()
    with TemporaryDirectory(prefix="wp-bench-automation-") as tmp_name:
        tmp = Path(tmp_name)
        fresh = _freshness(tmp, say)
        if fresh.get("error"):
            say(f"  [freshness] FAILED: {fresh['error']}; daemon log tail:\n{fresh.get('log_tail', '')}")
        shutil.rmtree(tmp / "mirror1", ignore_errors=True)
        shutil.rmtree(tmp / "staging1", ignore_errors=True)
        over = _overhead(tmp, say)
        if over.get("error"):
            say(f"  [overhead] FAILED: {over['error']}; daemon log tail:\n{over.get('log_tail', '')}")
    return _markdown(fresh, over, time.monotonic() - started)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


#: the stages of one hour's way from the source to its tile (keys, labels); they add up
STAGES = [
    ("scan_wait", "published → scan sensor tick that sees it starts"),
    ("scan_eval", "scan tick start → ingest run enqueued (sensor evaluation, run submission)"),
    ("i_queue", "ingest run enqueued → `RUN_STARTING` (queue: dequeue pass every 2 s, limits)"),
    ("i_proc", "`RUN_STARTING` → `RUN_START` (run worker process start-up)"),
    ("i_worker", "`RUN_START` → `STEP_START` (step start; a second process under the multiprocess executor)"),
    ("i_work", "ingest step start → this hour's GRIB materialization (earlier hours of the batch included)"),
    ("tiles_wait", "GRIB materialization → tiles sensor tick that sees it starts"),
    ("tiles_eval", "tiles tick start → tile run enqueued"),
    ("t_queue", "tile run enqueued → `RUN_STARTING` (queue)"),
    ("t_proc", "`RUN_STARTING` → `RUN_START` (run worker process start-up)"),
    ("t_worker", "`RUN_START` → `STEP_START` (step start; a second process under the multiprocess executor)"),
    ("t_work", "tile step start → this hour's conus 0.05 t2m tile written"),
]


def _markdown(fresh: dict, over: dict, seconds: float) -> str:
    lines = [
        "## Automation: freshness and orchestration overhead (issue 4)",
        "",
        "Command: `python -m weather_pipeline.bench --only automation` (part of `make bench`); "
        f"the section took {seconds / 60:.1f} min.",
        "",
        "Both parts run the production path: `dagster-daemon run` on the code location "
        "(`orchestration.local_daemon.dagster_daemon`), against a fresh instance (a temporary `DAGSTER_HOME`",
        "holding a copy of the repo's `dagster.yaml`: queue limits, `dequeue_interval_seconds: 2`, run",
        "retries, run monitoring), `WEATHER_PIPELINE_SOURCES=mirror` with a loopback `MirrorServer`, "
        f"`WEATHER_PIPELINE_SCAN_INTERVAL_S={SCAN_INTERVAL_S}`",
        "(the production default is 60 s; the tiles sensor's interval is 5 s), GRIB retention on (subsets",
        "deleted once tiled, the default). Every process the daemon started is stopped by process group",
        "when each part ends. Times are wall clock on this machine, which the daemon, its run workers and",
        "this process share.",
        "",
    ]
    lines += _fresh_markdown(fresh)
    lines += _over_markdown(over)
    return "\n".join(lines)


def _fresh_markdown(f: dict) -> list[str]:
    target = SCAN_INTERVAL_S + TARGETS["freshness_slack_s"]
    lines = [
        "### 1. Freshness: hour published → tile on disk",
        "",
        f"A {FRESH_HOURS}-hour HRRR run (`{f['run']}`, the newest run before the bench started whose hour is not",
        "00/06/12/18z) is generated into a staging directory first "
        f"({_fmt(f.get('generate_s'), 0)} s, outside the clock, so that the",
        "generator's CPU does not compete with the pipeline). The daemon is started, and once the scan",
        f"sensor has ticked (its first tick came {_fmt(f.get('first_tick_s'), 0)} s after the daemon started) the "
        f"hours are published one every {CADENCE_S} s",
        "by renaming the GRIB and then its `.idx` into the served tree (an hour exists at the source once its",
        f"`.idx` does). {CADENCE_S} s is not a multiple of the {SCAN_INTERVAL_S} s scan interval, so the hours "
        "land at every phase",
        "of the sensor's tick. Real HRRR hours land minutes apart; this cadence is faster, so consecutive",
        "hours' runs can overlap here where they would not in production.",
        "",
        f"Freshness of an hour = mtime of `cache/tiles/{REGION}/{RES}deg/{MODEL}/{{run}}/{VARIABLE}/tile_HHH.npz` "
        "(`CacheLayout.tile_path`) minus",
        "the mtime of its `.idx` (set to the moment of the rename). p50/p95 are linear interpolations",
        f"between order statistics (numpy's default); with {FRESH_HOURS} hours p95 lies between the two largest.",
        "",
    ]
    if f.get("error"):
        lines += [f"**Failed**: {f['error']}. Last lines of the daemon log:", "", "```",
                  *f.get("log_tail", "").splitlines()[-15:], "```", ""]
    rows = [r for r in f.get("rows", []) if not r["missing"]]
    if not rows:
        return lines
    fr = [r["fresh"] for r in rows]
    p50, p95, mx = _pct(fr, 50), _pct(fr, 95), max(fr)
    missing = [r["hour"] for r in f["rows"] if r["missing"]]
    lines += [
        "| measure | value |",
        "|---|---|",
        f"| hours measured | {len(rows)} of {FRESH_HOURS}" + (f" (missing: {missing})" if missing else "") + " |",
        f"| freshness p50 | **{p50:.1f} s** |",
        f"| freshness p95 | **{p95:.1f} s** (target ≤ scan interval + {TARGETS['freshness_slack_s']:g} s = "
        f"{target:g} s: **{'met' if p95 <= target else 'missed'}**) |",
        f"| freshness max (min) | {mx:.1f} s ({min(fr):.1f} s) |",
        f"| every tile of the hour ({rows[0]['n_tiles']} files: all variables, regions, resolutions), p50 / p95 | "
        f"{_pct([r['all_tiles'] for r in rows], 50):.1f} s / {_pct([r['all_tiles'] for r in rows], 95):.1f} s |",
        f"| tile partition materialized (event), p50 / p95 | {_pct([r['materialized'] for r in rows], 50):.1f} s / "
        f"{_pct([r['materialized'] for r in rows], 95):.1f} s |",
        *_health_lines(f["health"]),
        *_tick_lines(f.get("ticks", {})),
        f"| CPU used by other processes on the machine meanwhile (not this benchmark's) | "
        f"{f.get('other_cores', 0):.2f} cores on average, of {os.cpu_count()} |",
        "",
        "Where the time goes: each hour's delay split at the points the instance records (the sensor tick",
        "that requested the run, `RUN_ENQUEUED`, `RUN_STARTING` (Dagster 1.13 logs no `RUN_DEQUEUED`: the",
        "queue's dequeue is the start of `RUN_STARTING`), `RUN_START`, `STEP_START`, the hour's GRIB",
        "materialization) and the tile's mtime. The stages add up to the freshness. Seconds, over the hours:",
        "",
        "| stage | p50 | p95 | max | share of the total |",
        "|---|---|---|---|---|",
    ]
    total = sum(fr)
    for key, label in STAGES:
        vals = [r[key] for r in rows]
        lines.append(f"| {label} | {_pct(vals, 50):.1f} | {_pct(vals, 95):.1f} | {max(vals):.1f} | "
                     f"{100 * sum(vals) / total:.0f}% |")
    groups = {
        "detect": ("scan_wait", "scan_eval"), "i_launch": ("i_queue", "i_proc", "i_worker"), "ingest": ("i_work",),
        "t_detect": ("tiles_wait", "tiles_eval"), "t_launch": ("t_queue", "t_proc", "t_worker"), "build": ("t_work",),
    }
    g = {name: [sum(r[k] for k in keys) for r in rows] for name, keys in groups.items()}
    lines += [
        "",
        "Per hour (seconds after the first hour was published; detect = the first two stages, launch = queue +",
        "run process + step start):",
        "",
        "| hour | published | hours in its ingest / tile run | scan detect | ingest launch | ingest | "
        "tiles detect | tile launch | tile build | **freshness** |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in f["rows"]:
        if r["missing"]:
            lines.append(f"| {r['hour']:03d} | missing |||||||||")
            continue
        lines.append(
            f"| {r['hour']:03d} | {r['published']:.0f} | {r['ingest_hours']} / {r['tile_hours']} | "
            + " | ".join(f"{sum(r[k] for k in keys):.1f}" for keys in groups.values())
            + f" | **{r['fresh']:.1f}** |")
    med = {name: _pct(v, 50) for name, v in g.items()}
    procs = [r["i_proc"] + r["i_worker"] + r["t_proc"] + r["t_worker"] for r in rows]
    sensors = [r["scan_wait"] + r["scan_eval"] + r["tiles_wait"] + r["tiles_eval"] for r in rows]
    work = [r["i_work"] + r["t_work"] for r in rows]
    queue = [r["i_queue"] + r["t_queue"] for r in rows]
    multiprocess = any("worker_starting" in r.events for r in f["runs"])
    if multiprocess:
        step_proc = ("and (4) the multiprocess executor starts yet another process for the run's single step, "
                     "importing it all again")
        procs_note = ("each run is two fresh Python processes (the run worker, then the multiprocess executor's "
                      "step worker), each importing Dagster and the code location;")
    else:
        step_proc = "and (4) the in-process executor runs the single step in that process (resources, `STEP_START`)"
        procs_note = ("each run is a fresh Python process (the run worker; the jobs use the in-process executor), "
                      "importing Dagster and the code location;")
    lines += [
        "",
        "The chain of delays, in order: (1) the scan sensor sees an hour at its next tick: on average half",
        "the effective tick interval (above) after the hour appears, plus the tick's own evaluation (median",
        f"{med['detect']:.1f} s); (2) the run waits in the queue for the next dequeue pass (every 2 s) and any "
        "concurrency limit;",
        "(3) the daemon's run launcher starts a run worker process (`dagster api execute_run`: Python, Dagster",
        f"and the code location imported afresh), {step_proc} (ingest launch, 2-4, median {med['i_launch']:.1f} s);",
        f"(5) the ingest itself (median {med['ingest']:.1f} s); "
        f"(6) the tiles sensor's next tick (median {med['t_detect']:.1f} s); (7) queue and start-up",
        f"again for the tile run (median {med['t_launch']:.1f} s); "
        f"(8) the tile build up to this tile (median {med['build']:.1f} s).",
        "",
        f"Summed per hour (medians): sensor waits and ticks {_pct(sensors, 50):.1f} s, queue waits "
        f"{_pct(queue, 50):.1f} s, process start-ups {_pct(procs, 50):.1f} s,",
        f"actual work {_pct(work, 50):.1f} s.",
        "",
        "Sensor intervals: Dagster's sensor daemon evaluates the sensors in a loop every 5 s",
        "(`MIN_INTERVAL_LOOP_TIME` in `dagster/_daemon/sensor.py`) and skips a sensor whose last tick started",
        "less than its minimum interval ago, so a tick that starts a fraction of a second late is deferred by",
        f"a whole loop: see the effective tick intervals in the table above ({SCAN_INTERVAL_S} s and "
        f"{TILES_INTERVAL_S} s configured).",
        f"Run start-ups: {procs_note} when several start at once on 2 cores (an ingest and a tile run of",
        "neighbouring hours, the hourly `prune_cache` run, other people's work: see the CPU row above) they",
        "slow each other down, which is where the long launches in the per-hour table come from.",
        "",
    ]
    return lines


def _over_markdown(o: dict) -> list[str]:
    lines = [
        f"### 2. Orchestration overhead: a {OVERHEAD_HOURS}-hour run through the daemon vs in-process",
        "",
        f"A {OVERHEAD_HOURS}-hour HRRR run (`{o['run']}`, the newest 00/06/12/18z run), default variables, is generated "
        "into a second",
        "mirror before anything is timed"
        + (f" ({o['mirror_bytes'] / 1e9:.1f} GB in {o['generate_s']:.0f} s with two processes; deleted afterwards)"
           if "generate_s" in o else "") + ".",
        f"For this part the HRRR scan lookback is widened to {OVERHEAD_LOOKBACK_H} h with a `WEATHER_PIPELINE_CATALOG` "
        "overlay, because the",
        "newest 00/06/12/18z run can be almost 6 h old (the default lookback) and must stay in the",
        "scanner's window; it changes only how many runs the sensor lists per tick.",
        "",
        "* **Daemon**: from starting `dagster-daemon` (all hours already at the source) until the",
        f"  last of the {OVERHEAD_HOURS} `hrrr_tiles` partitions is materialized (timestamp of that materialization event).",
        "  This includes the daemon's own start-up and its first scan tick, as after a deployment.",
        "* **In-process**: the same work in this process, no Dagster, against the same mirror server, into",
        "  a separate cache: for each hour `ingest_hour(...)` (with the client and settings the asset's",
        "  resource builds), `build_hour(...)` and `retire_gribs(...)` (the default GRIB retention), then",
        "  `update_run_tile(...)` once for every region/resolution/variable. The process is warm (imports",
        "  done); weights are computed afresh into the new cache, as the daemon's first tile run does.",
        "",
    ]
    if o.get("error"):
        lines += [f"**Failed**: {o['error']}."]
        if o.get("log_tail"):
            lines += ["Last lines of the daemon log:", "", "```", *o["log_tail"].splitlines()[-15:], "```"]
        return lines + [""]
    b, runs = o["baseline"], o["runs"]
    ratio = o["daemon_s"] / b["total"]
    lines += [
        "| measure | value |",
        "|---|---|",
        f"| daemon: start → last tile partition materialized | **{o['daemon_s']:.1f} s** |",
        f"| in-process: ingest + build + retire, {OVERHEAD_HOURS} hours, then run tiles | **{b['total']:.1f} s** "
        f"(ingest {b['ingest']:.1f}, build {b['build']:.1f}, retire {b['retire']:.1f}, "
        f"run tiles {b['run_tiles']:.1f} for {b['run_tile_sets']} sets) |",
        f"| ratio daemon / in-process | **{ratio:.2f}** (target ≤ {TARGETS['overhead_ratio']:g}: "
        f"**{'met' if ratio <= TARGETS['overhead_ratio'] else 'missed'}**) |",
        f"| hourly tiles written, daemon / in-process | {o['daemon_tiles']} / {b['tiles']} |",
        *_health_lines(o["health"]),
        *_tick_lines(o.get("ticks", {})),
        f"| CPU used by other processes on the machine (not this benchmark's), daemon / in-process | "
        f"{o.get('other_cores', 0):.2f} / {o.get('baseline_other_cores', 0):.2f} cores on average, of "
        f"{os.cpu_count()} |",
        "",
    ]
    # Where the daemon's time goes.
    t0 = o["t_start"]
    work = [r for r in runs if r.at("step_start") is not None]
    steps = [(r.at("step_start"), r.at("step_success") or r.at("end") or r.at("step_start")) for r in work]
    busy = _union(steps)
    first_created = min((r.created for r in runs if r.task == "ingest_grib"), default=None)
    first_step = min((s for s, _ in steps), default=None)
    step_sum = {task: sum(e - s for r, (s, e) in zip(work, steps) if r.task == task) for task in ("ingest_grib", "build_tile")}
    lines += [
        "Every Dagster run, in order of creation (seconds; `created` is after the daemon's start; queue =",
        "`RUN_ENQUEUED` → `RUN_STARTING`; run process = `RUN_STARTING` → `RUN_START`; step start = `RUN_START` →",
        "`STEP_START`; step = `STEP_START` → `STEP_SUCCESS`; finish = `STEP_SUCCESS` → run end):",
        "",
        "| job | hours | status | created | queue | run process | step start | step | finish |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        hrs = f"{r.hours[0]}-{r.hours[-1]} ({len(r.hours)})" if r.hours else "-"
        lines.append(
            f"| `{r.job}` | {hrs} | {r.status} | {r.created - t0:.1f} | {_fmt(r.span('enqueued', 'starting'))} | "
            f"{_fmt(r.span('starting', 'start'))} | {_fmt(r.span('start', 'step_start'))} | "
            f"{_fmt(r.span('step_start', 'step_success'))} | {_fmt(r.span('step_success', 'end'))} |")
    idle = o["daemon_s"] - busy
    lines += [
        "",
        "| account of the daemon's wall time | s |",
        "|---|---|",
        f"| daemon start → first ingest run created (code location load, first scan tick) | "
        f"{_fmt(None if first_created is None else first_created - t0)} |",
        f"| daemon start → first step started | {_fmt(None if first_step is None else first_step - t0)} |",
        f"| time some step was executing (union of step intervals) | {busy:.1f} |",
        f"| time no step was executing (start-up, sensor ticks, queue, process start-ups) | {idle:.1f} |",
        f"| sum of ingest step times / in-process ingest | {step_sum['ingest_grib']:.1f} / {b['ingest']:.1f} |",
        f"| sum of tile step times / in-process build + retire + run tiles | {step_sum['build_tile']:.1f} / "
        f"{b['build'] + b['retire'] + b['run_tiles']:.1f} |",
        f"| (poll: all {OVERHEAD_HOURS} tile partitions seen materialized at) | {o['poll_s']:.1f} |",
        "",
    ]
    ingest = [r for r in runs if r.task == "ingest_grib"]
    tiling = [r for r in runs if r.task == "build_tile"]
    if len(ingest) == 1 and len(tiling) == 1 and all(r.at("step_start") and r.at("step_success") for r in runs
                                                       if r.task in ("ingest_grib", "build_tile")):
        i, t = ingest[0], tiling[0]
        i_loop = None if i.loop_end is None else i.loop_end - i.at("step_start")
        t_loop = None if t.loop_end is None else t.loop_end - t.at("step_start")
        ledger = [
            ("daemon start → ingest run enqueued (daemon and code location start-up, first scan tick)",
             (i.at("enqueued") or i.created) - t0, 0.0),
            ("ingest run enqueued → step start (queue, run process, step start)",
             i.at("step_start") - (i.at("enqueued") or i.created), 0.0),
            ("ingest step (`ingest_hour` per hour + metadata, log and materialization events)",
             i.span("step_start", "step_success"), b["ingest"]),
            ("ingest step end → tile run enqueued (run teardown overlaps; tiles sensor tick)",
             (t.at("enqueued") or t.created) - i.at("step_success"), 0.0),
            ("tile run enqueued → step start (queue, run process, step start)",
             t.at("step_start") - (t.at("enqueued") or t.created), 0.0),
            ("tile step start → last tile materialization (build, retire, preview, metadata per hour; run tiles; "
             "checks)", o["t_end"] - t.at("step_start"), b["build"] + b["retire"] + b["run_tiles"]),
        ]
        extra_total = o["daemon_s"] - b["total"]
        lines += [
            "The daemon's runs here are sequential (one ingest run, then one tile run), so its wall time splits",
            "into consecutive segments; the in-process column holds the same work's share of the baseline:",
            "",
            "| segment | daemon s | in-process s | extra s | share of the extra |",
            "|---|---|---|---|---|",
        ]
        for label, d, base in ledger:
            lines.append(f"| {label} | {d:.1f} | {base:.1f} | {d - base:.1f} | {100 * (d - base) / extra_total:.0f}% |")
        lines += [
            f"| **total** | **{o['daemon_s']:.1f}** | **{b['total']:.1f}** | **{extra_total:.1f}** | 100% |",
            "",
            "Inside the steps: the ingest step's loop over the hours took "
            f"{_fmt(i_loop)} s (in-process `ingest_hour` calls: {b['ingest']:.1f} s), the rest of the step",
            f"(last hour's log line → `STEP_SUCCESS`: the {OVERHEAD_HOURS} materialization events) "
            f"{_fmt(None if i_loop is None else i.span('step_start', 'step_success') - i_loop)} s; "
            f"the tile step's loop over the hours {_fmt(t_loop)} s",
            f"(in-process `build_hour` + `retire_gribs`: {b['build'] + b['retire']:.1f} s), the rest (run tiles, "
            "ingested-md5 lookups, checks, materialization",
            f"events) {_fmt(None if t_loop is None else t.span('step_start', 'step_success') - t_loop)} s "
            f"(in-process run tiles: {b['run_tiles']:.1f} s).",
            "",
        ]
    lines += [
        "Step times include what the assets add to the in-process calls: per-partition materialization",
        "metadata, the t2m preview, the asset checks' reads, the GRIB md5 lookups, event-log writes; and",
        "when an ingest step and a tile step run at once they share the machine's 2 cores.",
        "",
    ]
    return lines
