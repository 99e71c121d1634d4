"""The automation end to end: the real Dagster daemon against the loopback mirror.

The mirror publishes a new HRRR run hour by hour while the test watches; the ScanSource sensor
picks the hours up, the queue runs the ingest and the tiles follow; an injected failure that
outlasts the HTTP client's retries is retried by Dagster and succeeds; a triggered prune_cache
run removes an old run and its partition. Every process started here is stopped by its id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, RunsFilter

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import format_run_key, load_catalog
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline.orchestration.local_daemon import dagster_daemon, wait_for
from weather_pipeline.orchestration.partitions import partition_key

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
HOURS = (0, 1, 2, 3)


def _materialized(instance, asset: str, run: str) -> set[int]:
    keys = {str(partition_key(run, h)): h for h in HOURS}
    return {keys[k] for k in set(instance.get_materialized_partitions(AssetKey(asset))) & set(keys)}


def test_sensor_queue_retries_tiles_and_prune(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    mirror_root, cache_root = tmp_path / "mirror", tmp_path / "cache"
    mirror_root.mkdir()
    layout = CacheLayout(cache_root)
    model = load_catalog().model("hrrr")
    run = format_run_key(model.latest_run_before(datetime.now(timezone.utc)))

    # An old run already in the cache and in Dagster, for the prune to remove.
    old_run = format_run_key(model.latest_run_before(datetime.now(timezone.utc) - timedelta(days=5)))
    old_file = layout.grib_path("hrrr", old_run, "t2m", 0)
    old_file.parent.mkdir(parents=True)
    old_file.write_bytes(b"old")

    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.get()
        instance.add_dynamic_partitions("hrrr_runs", [old_run])
        with MirrorServer(mirror_root) as server:
            # Hour 1's .idx fails 3 times: more than the client's 2 attempts, so the hour fails
            # once on transient trouble and the ingest tries it again after its backoff.
            server.faults.add(f"*{mirror_relative_path('hrrr', run, 1).split('/', 1)[1]}.idx", "status", code=503, times=3)
            env = {
                **os.environ,
                "WEATHER_PIPELINE_SOURCES": "mirror",
                "WEATHER_PIPELINE_MIRROR_URL": server.url,
                "WEATHER_PIPELINE_CACHE": str(cache_root),
                "WEATHER_PIPELINE_SCAN_INTERVAL_S": "5",
                "WEATHER_PIPELINE_HTTP_ATTEMPTS": "2",
                "WEATHER_PIPELINE_HTTP_BACKOFF_S": "0.1",
                "WEATHER_PIPELINE_STATUS_INTERVAL_S": "5",
            }
            with dagster_daemon(env, log_path=tmp_path / "daemon.log") as daemon:
                for hour in HOURS:  # the mirror publishes the run hour by hour
                    generate_run(mirror_root, "hrrr", run, [hour])
                    time.sleep(2)
                from weather_pipeline.orchestration.sensors import IN_FLIGHT

                done = wait_for(lambda: _materialized(instance, "hrrr_tiles", run) == set(HOURS)
                                and not instance.get_runs_count(RunsFilter(statuses=IN_FLIGHT)), timeout=420, interval=2)
                log_tail = (tmp_path / "daemon.log").read_text()[-3000:]
                assert done, f"tiles: {_materialized(instance, 'hrrr_tiles', run)}; daemon log tail:\n{log_tail}"
                assert daemon.poll() is None

                # The failed hour was tried again by the ingest, and landed.
                retried = [
                    r for r in instance.get_runs(RunsFilter(tags={"task": "ingest_grib", "run": run}))
                    if any("trying them again" in (e.message or "") for e in instance.all_logs(r.run_id))
                ]
                assert retried, "no ingest run tried a failed hour again"
                assert _materialized(instance, "hrrr_grib", run) == set(HOURS)
                for hour in HOURS:
                    assert layout.tile_path("conus", 0.05, "hrrr", run, "t2m", hour).is_file()
                assert layout.run_tile_path("conus", 0.05, "hrrr", run, "t2m").is_file()

                # Deep status: the daemon's sensor keeps deep.json current; the CLI and the page agree.
                def status_file_shows_run():
                    try:
                        doc = json.loads(layout.deep_status_path.read_text())
                    except (OSError, ValueError):
                        return False
                    entry = next((e for e in doc["inventory"] if e["run"] == run), None)
                    return entry is not None and entry["hours_have"] == len(HOURS) and not entry["tiles_missing_hours"]

                assert wait_for(status_file_shows_run, timeout=60, interval=1), "deep.json never showed the run"
                written = json.loads(layout.deep_status_path.read_text())
                cli = subprocess.run([str(Path(sys.executable).parent / "weather-pipeline"), "status", "--json"],
                                     env=env, capture_output=True, text=True, timeout=120)
                assert cli.returncode in (0, 1, 2) and cli.stdout, cli.stderr
                fresh = json.loads(cli.stdout)
                from weather_pipeline.status.app import StatusServer, create_app

                with StatusServer(create_app(layout.deep_status_path)) as page:
                    served = json.loads(urllib.request.urlopen(f"{page.url}/api/status/deep", timeout=10).read())

                def runs_view(doc):
                    return {(e["model"], e["run"]): (e["status"], e["hours_have"], e["missing_hours"], e["source_hours"])
                            for e in doc["inventory"] if e["run"] == run}

                assert runs_view(fresh) == runs_view(written) == runs_view(served)
                assert cli.returncode == {"healthy": 0, "degraded": 1, "unhealthy": 2}[fresh["health"]]
                assert fresh["queue"]["daemon_alive"] and fresh["queue"]["workers_online"] == 4

                # Trigger the prune job through the queue, as an operator would.
                subprocess.run(
                    [str(Path(sys.executable).parent / "dagster"), "job", "launch", "-m", "weather_pipeline.definitions",
                     "-j", "prune_cache"],
                    env=env, check=True, capture_output=True, timeout=120,
                )
                pruned = wait_for(lambda: not old_file.parent.parent.exists(), timeout=180, interval=2)
                assert pruned, (tmp_path / "daemon.log").read_text()[-3000:]
                assert wait_for(lambda: old_run not in instance.get_dynamic_partitions("hrrr_runs"), timeout=30)
                assert run in instance.get_dynamic_partitions("hrrr_runs")
                # Gap fill: a run older than the scanner's lookback is only found by `gaps plan`.
                gap_run = format_run_key(model.latest_run_before(
                    datetime.now(timezone.utc) - timedelta(hours=model.scan_lookback_hours + 2)))
                generate_run(mirror_root, "hrrr", gap_run, [0])
                cli = [str(Path(sys.executable).parent / "weather-pipeline"), "gaps"]
                planned = subprocess.run(cli + ["plan", "--model", "hrrr", "--since", gap_run], env=env,
                                         check=True, capture_output=True, text=True, timeout=120).stdout
                manifest = tmp_path / "gaps.jsonl"
                manifest.write_text(planned)
                assert f'"run": "{gap_run}"' in planned and '"hour": 0' in planned
                assert subprocess.run(cli + ["verify", str(manifest)], env=env, capture_output=True, timeout=60).returncode == 1
                subprocess.run(cli + ["dispatch", str(manifest)], env=env, check=True, capture_output=True, timeout=120)
                filled = wait_for(
                    lambda: subprocess.run(cli + ["verify", str(manifest)], env=env, capture_output=True,
                                           timeout=60).returncode == 0,
                    timeout=240, interval=5,
                )
                assert filled, (tmp_path / "daemon.log").read_text()[-3000:]
                gap_runs = instance.get_runs(RunsFilter(tags={"run": gap_run, "task": "ingest_grib"}))
                assert gap_runs and all(r.tags["dagster/priority"] == "-10" for r in gap_runs)
            assert daemon.poll() is not None  # stopped
    finally:
        os.environ.pop("DAGSTER_HOME", None)
