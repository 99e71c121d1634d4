"""End to end through Dagster's own processes: the README's CLI line and the webserver's view.

Slow (each Dagster process start costs seconds); run in CI by `make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_signals() -> None:
    # A non-interactive shell may start children with SIGINT/SIGTERM ignored; Dagster then
    # ignores our stop request. Restore the defaults before exec (DESIGN.md section 4).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture()
def dagster_env(tmp_path, mirror):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "WEATHER_PIPELINE_SOURCES": "mirror",
        "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
        "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache"),
    }
    # The run partition must exist before the CLI can target it.
    from dagster import DagsterInstance

    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME")
        else:
            os.environ["DAGSTER_HOME"] = old
    return env, tmp_path


def test_readme_cli_materializes_a_range_in_one_run(dagster_env):
    env, tmp = dagster_env
    start, end = partition_key(HRRR_RUN, 0), partition_key(HRRR_RUN, 1)
    proc = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "weather_pipeline.definitions",
         "--select", "hrrr_grib", "--partition-range", f"{start}...{end}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_reset_signals,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for hour in (0, 1):
        assert (tmp / "cache/gribs/hrrr" / HRRR_RUN / "t2m" / f"grib_{hour:03d}.grib2").is_file()
    assert "RUN_SUCCESS" in proc.stderr or "RUN_SUCCESS" in proc.stdout
    # One Dagster run for the whole range.
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with DagsterInstance.get() as instance:
            assert len(instance.get_run_records()) == 1
    finally:
        os.environ.pop("DAGSTER_HOME")


def test_webserver_shows_the_assets_partitions_and_checks(dagster_env):
    env, _ = dagster_env
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_reset_signals,
    )
    try:
        query = {"query": "{ assetNodes { assetKey { path } groupName partitionKeysByDimension { name partitionKeys } "
                           "assetChecksOrError { ... on AssetChecks { checks { name } } } } }"}
        deadline, nodes = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps(query).encode(),
                                             headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(req, timeout=10).read())
                nodes = body["data"]["assetNodes"]
                if nodes:
                    break
            except (OSError, KeyError, TypeError):
                pass
            time.sleep(1)
        assert nodes, "the webserver never served the asset graph"
        by_name = {n["assetKey"]["path"][-1]: n for n in nodes}
        hrrr = by_name["hrrr_grib"]
        assert hrrr["groupName"] == "hrrr" and "gfs_grib" in by_name
        dims = {d["name"]: d["partitionKeys"] for d in hrrr["partitionKeysByDimension"]}
        assert dims["run"] == [HRRR_RUN]
        assert dims["hour"][:3] == ["000", "001", "002"] and len(dims["hour"]) == 49
        tiles = by_name["hrrr_tiles"]
        assert {c["name"] for c in tiles["assetChecksOrError"]["checks"]} == {
            "sidecar_md5_matches_grib", "values_within_physical_bounds", "nan_fraction_under_threshold",
            "tiles_match_sidecars"}
        assert {c["name"] for c in hrrr["assetChecksOrError"]["checks"]} == {"gribs_match_ingest"}
        assert by_name["gfs_tiles"]["groupName"] == "gfs"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
