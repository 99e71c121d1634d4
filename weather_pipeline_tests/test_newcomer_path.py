"""The newcomer's path, in a browser: `weather-pipeline demo` (what `make demo` runs), then the
Dagster UI's asset pages and the status page, rendered by headless Chromium and checked;
screenshots are kept in test-artifacts/ (newcomer-*.png)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from weather_pipeline.orchestration.local_daemon import stop_process_group, wait_for
from weather_pipeline.status.app import StatusServer, create_app
from weather_pipeline_tests.status.test_page_browser import browser_args, chromium, dump_dom, run_browser  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot(chromium: str, tmp_path: Path, url: str, name: str) -> None:
    shot = tmp_path / name
    run_browser(browser_args(chromium, tmp_path / f"profile-{name}")
                + ["--virtual-time-budget=20000", "--hide-scrollbars", "--window-size=1400,1000",
                   f"--screenshot={shot}", url])
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)


def test_demo_then_the_ui_and_the_status_page(chromium: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    demo = subprocess.run([str(BIN / "weather-pipeline"), "demo", "--workdir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-2000:]
    assert "health: HEALTHY" in demo.stdout, demo.stdout[-2000:]

    port = _free_port()
    ui = f"http://127.0.0.1:{port}"
    web_env = {**env, "WEATHER_PIPELINE_CATALOG": str(home / "demo-catalog.toml"),
               "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache"), "WEATHER_PIPELINE_SOURCES": "mirror",
               "WEATHER_PIPELINE_MIRROR_URL": "http://127.0.0.1:9", "WEATHER_PIPELINE_DAGSTER_URL": ui}
    with open(tmp_path / "webserver.log", "wb") as log:
        web = subprocess.Popen([str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                                "-p", str(port)], cwd=REPO, env=web_env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(ui + "/server_info", timeout=5).status == 200
            except OSError:
                return False

        assert wait_for(up, timeout=300, interval=1), (tmp_path / "webserver.log").read_text()[-2000:]

        # The Dagster UI: the demo's four hours of each model, materialized; the checks listed.
        for model in ("hrrr", "gfs"):
            dom = dump_dom(chromium, tmp_path, f"{ui}/assets/{model}_grib?view=partitions")
            text = " ".join(dom.text.split())
            assert f"{model}_grib" in text and "Materialized (4)" in text, text[:2000]
        dom = dump_dom(chromium, tmp_path, f"{ui}/assets/hrrr_tiles?view=checks")
        text = " ".join(dom.text.split())
        for check in ("tiles_match_sidecars", "sidecar_md5_matches_grib", "values_within_physical_bounds"):
            assert check in text, text[:2000]
        _screenshot(chromium, tmp_path, f"{ui}/assets/hrrr_grib?view=partitions", "newcomer-ui-partitions.png")

        # The status page over the demo's deep.json: healthy, both runs complete, links to this UI.
        status = tmp_path / "cache" / "status" / "deep.json"
        with StatusServer(create_app(status, dagster_url=ui)) as page:
            dom = dump_dom(chromium, tmp_path, page.url + "/status")
            assert dom.by_id("health-badge").text == "healthy"
            rows = dom.by_id("matrix-body").find_all("tr")
            assert {(r.attrs.get("data-model"), r.text.count("complete") > 0) for r in rows} == {("hrrr", True), ("gfs", True)}
            # the demo's daemon has stopped: once its document is 3 intervals old the page says so
            assert wait_for(lambda: "daemon not writing" in dump_dom(chromium, tmp_path, page.url + "/status")
                            .by_id("banner").text, timeout=60, interval=2)
            _screenshot(chromium, tmp_path, page.url + "/status", "newcomer-status.png")
    finally:
        stop_process_group(web)
