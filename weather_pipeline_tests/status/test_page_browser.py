"""The status page in a real browser: Debian's headless Chromium renders it from the live API.

Installs ``chromium`` with apt when it is missing (the test fails, not skips, if that fails),
serves the app on a free loopback port, and checks the DOM the page's script builds, that
document strings stay text, that the Retry button reaches Dagster (a fake GraphQL endpoint)
and shows the outcome inline; and leaves a screenshot at ``test-artifacts/status-page.png``.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from weather_pipeline.status.app import StatusServer, create_app
from weather_pipeline_tests.status.test_app import FAILED_RUN, NEW_RUN, FakeDagster, example, write

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "test-artifacts" / "status-page.png"
BROWSER_TIMEOUT_S = 45


# -- a small DOM for assertions -------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list["Node | str"] = []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self) -> Iterator["Node"]:
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list["Node"]:
        attrs = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def find(self, tag: str | None = None, **attrs: str) -> "Node":
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag or '*'} {attrs}>, found {len(found)}"
        return found[0]

    def by_id(self, id_: str) -> "Node":
        return self.find(id=id_)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_endtag(self, tag: str) -> None:
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse_dom(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def squash(text: str) -> str:
    return " ".join(text.split())


# -- browser --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt if missing (a failed install fails the test)."""
    if not Path(CHROMIUM).exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                pytest.fail(f"installing chromium: {' '.join(cmd)} failed: {exc}")
            if done.returncode != 0:
                pytest.fail(f"installing chromium: {' '.join(cmd)} exited {done.returncode}:\n"
                            f"{(done.stderr or done.stdout)[-3000:]}")
        if not Path(CHROMIUM).exists():
            pytest.fail(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


def browser_args(chromium: str, profile: Path) -> list[str]:
    profile.mkdir(parents=True, exist_ok=True)
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]


def run_browser(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {BROWSER_TIMEOUT_S} s: {' '.join(args)}")
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def dump_dom(chromium: str, tmp_path: Path, url: str) -> Node:
    html = run_browser(browser_args(chromium, tmp_path / "profile-dom")
                       + ["--virtual-time-budget=5000", "--dump-dom", url])
    assert "</html>" in html, html[-500:]
    return parse_dom(html)


@pytest.fixture()
def page_url(tmp_path: Path) -> Iterator[str]:
    """The app over a copy of the example document, generated 15 s ago."""
    path = write(tmp_path / "cache" / "status" / "deep.json", example(age_s=15))
    with StatusServer(create_app(path)) as server:
        yield server.url + "/status"


# -- tests ----------------------------------------------------------------------------------


def test_page_renders_the_deep_status(chromium: str, tmp_path: Path) -> None:
    doc = example(age_s=15)
    # as core.status writes it, missing_hours lists every expected hour not in, published or not
    gfs_hours = list(range(121)) + list(range(123, 385, 3))
    doc["inventory"].append({"model": "gfs", "run": "20261122_06", "status": "in_progress", "hours_expected": 209,
                             "hours_have": 40, "missing_hours": gfs_hours[40:], "source_hours": 42,
                             "reason": "download queued or running", "tiles_missing_hours": [], "tiles_have": 40})
    with StatusServer(create_app(write(tmp_path / "deep.json", doc))) as server:
        dom = dump_dom(chromium, tmp_path, server.url + "/status")

    # summary metrics
    assert dom.by_id("health-badge").text == "degraded"
    assert squash(dom.by_id("m-workers").text).startswith("4 / 4")
    assert "2 running now" in dom.by_id("m-workers").text
    assert squash(dom.by_id("m-pending").text).startswith("5")
    assert squash(dom.by_id("m-failure").text).startswith("8.3 %")
    assert "1 of 12 finished runs failed" in dom.by_id("m-failure").text
    assert "12.5 s ago" in dom.by_id("m-daemon").text and "daemon alive" in dom.by_id("m-daemon").text
    assert "17:00:00 UTC" in dom.by_id("m-generated").text or "UTC" in dom.by_id("m-generated").text
    assert dom.by_id("banner").attrs.get("hidden") is not None  # fresh document: no stale banner
    assert dom.by_id("link-runs").attrs["href"] == "http://127.0.0.1:3000/runs"
    assert dom.by_id("link-assets").attrs["href"] == "http://127.0.0.1:3000/assets"

    # jobs: the failed row links to Dagster and has a Retry button; the running one has none
    failed = dom.find("tr", data_run_id=FAILED_RUN)
    assert failed.attrs["data-status"] == "FAILURE"
    link = failed.find("a")
    assert link.attrs["href"] == f"http://127.0.0.1:3000/runs/{FAILED_RUN}" and link.text == FAILED_RUN[:8]
    cells = [squash(td.text) for td in failed.find_all("td")]
    assert cells[1:7] == ["ingest_grib", "hrrr 20261122_15 · hours 000-003", "FAILURE", "16:50:00 UTC", "9.1 s",
                          "pid 4242"]
    assert "GRIB download failed: HTTP 503" in cells[7]
    assert failed.find("button").text == "Retry"
    running = dom.find("tr", data_run_id="6f1c2d3e-0000-4000-8000-000000000002")
    assert running.attrs["data-status"] == "STARTED" and running.find_all("button") == []

    # run matrix: one cell per forecast hour of each run
    matrix = dom.by_id("matrix-body")
    hrrr = matrix.find("tr", data_model="hrrr", data_run="20261122_15")
    states = {int(c.attrs["data-hour"]): c.attrs["data-state"] for c in hrrr.iter() if "data-hour" in c.attrs}
    assert sorted(states) == list(range(19))
    assert sorted(h for h, s in states.items() if s == "missing") == [4, 5]
    assert [h for h, s in states.items() if s == "tile"] == [3]
    assert {s for h, s in states.items() if h not in (3, 4, 5)} == {"ok"}
    row = squash(hrrr.text)
    assert "source 19 / have 17" in row and "missing 4, 5" in row and "tile missing 3" in row
    assert "GRIB download failed: HTTP 503" in row
    gfs = matrix.find("tr", data_model="gfs", data_run="20261122_12")
    gfs_states = [c.attrs["data-state"] for c in gfs.iter() if "data-hour" in c.attrs]
    assert len(gfs_states) == 209
    assert gfs_states.count("ok") == 40 and gfs_states.count("missing") == 2 and gfs_states.count("beyond") == 167
    assert "source 42 / have 40" in squash(gfs.text) and "not yet at the source 42-384" in squash(gfs.text)
    gfs06 = matrix.find("tr", data_model="gfs", data_run="20261122_06")
    states06 = {int(c.attrs["data-hour"]): c.attrs["data-state"] for c in gfs06.iter() if "data-hour" in c.attrs}
    assert list(states06) == gfs_hours
    assert [h for h, s in states06.items() if s == "missing"] == [40, 41]
    assert [h for h, s in states06.items() if s == "beyond"] == gfs_hours[42:]
    assert "missing 40, 41 · not yet at the source 42-384" in squash(gfs06.text)

    # disk usage per model and run, total, cache age
    disk = dom.by_id("disk-body")
    assert [[td.text for td in tr.find_all("td")][:3] for tr in disk.find_all("tr")] == [
        ["gfs", "20261122_12", "98.8 MB"], ["hrrr", "20261122_15", "123.5 MB"]]
    assert "222.2 MB" in dom.by_id("disk-total").text
    assert "2026-11-22 15:10:00 UTC" in dom.by_id("cache-oldest").text
    assert "2026-11-22 16:59:58 UTC" in dom.by_id("cache-newest").text

    # alerts, coloured by level, critical first
    alerts = dom.by_id("alerts").find_all("li")
    assert [a.attrs["data-level"] for a in alerts] == ["critical", "warning", "warning"]
    assert "level-critical" in alerts[0].classes() and "1 of 12 runs failed in the last hour" in alerts[0].text
    assert "level-warning" in alerts[1].classes() and "aws unreachable since" in alerts[1].text
    assert "hrrr 20261122_15: GRIB present, tile missing for hour 3" in alerts[2].text

    # sources: which answer, which do not, since when, why
    rows = dom.by_id("sources-body").find_all("tr")
    assert [(tr.attrs["data-source"], tr.attrs["data-reachable"]) for tr in rows] == [("aws", "false"), ("nomads", "true")]
    assert "UNREACHABLE" in rows[0].text and "connection refused" in rows[0].text
    assert "1 unreachable" in dom.by_id("sources-count").text
    assert "1 damaged hour" in dom.by_id("repairs").text


def test_document_strings_are_rendered_as_text(chromium: str, tmp_path: Path) -> None:
    hostile = '<img src=x onerror="document.title=\'pwned\'"><b id="injected">bold</b>'
    doc = example(age_s=5)
    doc["jobs"][0]["error"] = hostile
    doc["alerts"][0]["message"] = hostile
    doc["inventory"][0]["reason"] = hostile
    doc["jobs"][1]["worker"] = "<script>document.title='pwned'</script>"
    with StatusServer(create_app(write(tmp_path / "deep.json", doc))) as server:
        dom = dump_dom(chromium, tmp_path, server.url + "/status")
    assert dom.find_all(id="injected") == [] and dom.find_all("img") == [] and dom.find_all("b") == []
    assert dom.find("title").text == "degraded · Weather pipeline status"
    assert hostile in dom.find("tr", data_run_id=FAILED_RUN).text
    assert hostile in dom.by_id("alerts").text
    assert hostile in dom.by_id("matrix-body").find("tr", data_model="hrrr", data_run="20261122_15").text


def test_stale_or_missing_document_is_announced(chromium: str, tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    with StatusServer(create_app(path)) as server:
        dom = dump_dom(chromium, tmp_path, server.url + "/status")
        assert "Status unavailable" in dom.by_id("banner").text and "does not exist" in dom.by_id("banner").text
        assert dom.by_id("health-badge").text == "unknown"
        write(path, example(age_s=3600, health="healthy"))
        dom = dump_dom(chromium, tmp_path, server.url + "/status")
        banner = dom.by_id("banner")
        assert banner.attrs.get("hidden") is None and "Status document is 1 h 00 min old, daemon not writing" in banner.text
        # three missed writes (3 x 30 s) are enough: the daemon card goes red, whatever the document said
        write(path, example(age_s=100, health="healthy"))
        dom = dump_dom(chromium, tmp_path, server.url + "/status")
    assert re.search(r"Status document is 1 min 4\d s old, daemon not writing", dom.by_id("banner").text)
    assert "not writing" in dom.by_id("m-daemon").text and "daemon alive" not in dom.by_id("m-daemon").text
    assert "tone-bad-border" in dom.by_id("metric-daemon").classes()
    assert dom.by_id("m-workers").text.startswith("? / 4")


def test_retry_button_launches_a_reexecution_and_shows_the_outcome(chromium: str, tmp_path: Path) -> None:
    import websockets.sync.client as websockets_sync  # installed with uvicorn[standard] (dagster-webserver)
    path = write(tmp_path / "deep.json", example(age_s=5))
    with FakeDagster() as fake, StatusServer(create_app(path, dagster_url=fake.url)) as server:
        profile = tmp_path / "profile-cdp"
        proc = subprocess.Popen(browser_args(chromium, profile) + ["--remote-debugging-port=0", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 20
            while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            with websockets_sync.connect(ws_url, max_size=None, open_timeout=10) as ws:
                ids = iter(range(1, 1000))

                def cdp(method: str, **params: Any) -> dict[str, Any]:
                    msg_id = next(ids)
                    ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                    while True:
                        msg = json.loads(ws.recv(timeout=20))
                        if msg.get("id") == msg_id:
                            assert "error" not in msg, msg
                            return msg["result"]

                def js(expression: str) -> Any:
                    result = cdp("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
                    assert "exceptionDetails" not in result, result
                    return result["result"].get("value")

                cdp("Page.navigate", url=server.url + "/status")
                wait_for = """new Promise((resolve, reject) => {
                    const t0 = Date.now();
                    (function poll() {
                        const v = (%s);
                        if (v) return resolve(v);
                        if (Date.now() - t0 > 15000) return reject(new Error("timed out waiting for: %s"));
                        setTimeout(poll, 50);
                    })();
                })"""
                cond = f'document.getElementById("retry-{FAILED_RUN}")'
                js(wait_for % (cond, "the Retry button"))
                js(f'{cond}.click(), true')
                outcome = f'document.querySelector("[data-retry-for=\\"{FAILED_RUN}\\"] .retry-outcome.ok")'
                text = js(wait_for % (f"{outcome} && {outcome}.textContent", "the retry outcome"))
                href = js(f'{outcome}.querySelector("a").href')
                disabled = js(f"{cond}.disabled")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert text == f"Re-execution launched: {NEW_RUN[:8]}"
    assert href == f"{fake.url}/runs/{NEW_RUN}"
    assert disabled is True
    assert len(fake.mutations) == 1 and fake.mutations[0]["variables"] == {"parentRunId": FAILED_RUN}


def test_screenshot(chromium: str, tmp_path: Path, page_url: str) -> None:
    shot = tmp_path / "status-page.png"
    run_browser(browser_args(chromium, tmp_path / "profile-shot")
                + ["--virtual-time-budget=5000", "--hide-scrollbars", "--window-size=1400,1000",
                   f"--screenshot={shot}", page_url])
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
