"""The status server: the deep-status API, /health, the page skeleton, and Retry via Dagster GraphQL.

The app runs under uvicorn on a free loopback port (StatusServer) and is called with urllib:
httpx, which starlette's TestClient needs, is not a dependency. Retry talks to a fake Dagster
GraphQL endpoint (http.server on loopback) that records what it is sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from weather_pipeline.status import app as status_app
from weather_pipeline.status.app import StatusServer, create_app

EXAMPLE = Path(status_app.__file__).with_name("example_deep.json")
FAILED_RUN = "6f1c2d3e-0000-4000-8000-000000000001"
NEW_RUN = "a9b8c7d6-1111-4222-8333-444455556666"


# -- helpers ------------------------------------------------------------------------------


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def example(age_s: float = 0.0, **changes: Any) -> dict[str, Any]:
    """The example document, generated ``age_s`` seconds ago."""
    doc = json.loads(EXAMPLE.read_text())
    doc["generated_at"] = iso(datetime.now(timezone.utc) - timedelta(seconds=age_s))
    doc.update(changes)
    return doc


def write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def call(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


#: what the status page's Retry button sends
PAGE_HEADERS = {"X-Weather-Pipeline": "retry", "Sec-Fetch-Site": "same-origin"}


def call_json(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, hdrs, body = call(url, method, headers)
    assert hdrs.get("content-type", "").startswith("application/json"), (status, hdrs, body[:200])
    return status, json.loads(body)


@contextmanager
def served(status_path: Path, **kwargs: Any) -> Iterator[str]:
    with StatusServer(create_app(status_path, **kwargs)) as server:
        yield server.url


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeDagster:
    """A loopback HTTP server answering GraphQL POSTs like Dagster 1.13, recording every request.

    ``run_status`` is what ``runOrError`` reports (None: RunNotFoundError); ``launch`` is the
    ``launchPipelineReexecution`` result object; ``respond`` overrides everything.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.run_status: str | None = "FAILURE"
        self.launch: dict[str, Any] = {"__typename": "LaunchRunSuccess", "run": {"runId": NEW_RUN, "status": "QUEUED"}}
        self.respond: Callable[[dict[str, Any]], tuple[int, Any]] | None = None
        self.children: list[dict[str, Any]] = []  # re-executions Dagster already has for the run
        self.delay_s = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "content_type": self.headers.get("Content-Type"), **body})
                time.sleep(fake.delay_s)
                status, answer = fake.answer(body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def answer(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.respond:
            return self.respond(body)
        query = body["query"]
        if "runOrError" in query:
            run_id = body["variables"]["runId"]
            if self.run_status is None:
                found = {"__typename": "RunNotFoundError", "message": f"Run {run_id} could not be found."}
            else:
                found = {"__typename": "Run", "runId": run_id, "status": self.run_status, "jobName": "hrrr_ingest_grib",
                         "rootRunId": None, "repositoryOrigin": {"repositoryLocationName": "loc", "repositoryName": "repo"},
                         "assetSelection": [{"path": ["hrrr_grib"]}], "tags": [{"key": "model", "value": "hrrr"}]}
            return 200, {"data": {"runOrError": found}}
        if "runsOrError" in query:
            return 200, {"data": {"runsOrError": {"__typename": "Runs", "results": self.children}}}
        if "launchPipelineReexecution" in query:
            # like dagster-webserver: a resolver that caught an exception makes it an HTTP 500
            status = 500 if self.launch.get("__typename") == "PythonError" else 200
            return status, {"data": {"launchPipelineReexecution": self.launch}}
        return 400, {"errors": [{"message": "unexpected query"}]}

    @property
    def mutations(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "launchPipelineReexecution" in r["query"]]

    def __enter__(self) -> "FakeDagster":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture()
def status_file(tmp_path: Path) -> Path:
    return write(tmp_path / "cache" / "status" / "deep.json", example(age_s=42))


@pytest.fixture()
def fake_dagster() -> Iterator[FakeDagster]:
    with FakeDagster() as fake:
        yield fake


# -- GET /api/status/deep -----------------------------------------------------------------


def test_api_returns_the_document_with_stale_s(status_file: Path) -> None:
    on_disk = status_file.read_bytes()
    mtime = status_file.stat().st_mtime_ns
    written = json.loads(on_disk)
    with served(status_file) as url:
        status, headers, body = call(url + "/api/status/deep")
    assert status == 200
    assert headers["cache-control"] == "no-store"
    doc = json.loads(body)
    for key, value in written.items():
        if key != "inventory":
            assert doc[key] == value, key
    assert [{k: v for k, v in e.items() if k != "expected_hours"} for e in doc["inventory"]] == written["inventory"]
    assert 41 <= doc["stale_s"] < 60
    assert doc["stale"] is False
    # the file is read, never rewritten
    assert status_file.read_bytes() == on_disk and status_file.stat().st_mtime_ns == mtime


def test_api_rereads_the_file_on_every_request(status_file: Path) -> None:
    with served(status_file) as url:
        assert call_json(url + "/api/status/deep")[1]["queue"]["pending"] == 5
        doc = example()
        doc["queue"]["pending"] = 77
        write(status_file, doc)
        assert call_json(url + "/api/status/deep")[1]["queue"]["pending"] == 77


def test_api_adds_each_runs_forecast_hours_from_the_catalog(status_file: Path) -> None:
    with served(status_file) as url:
        inventory = {e["model"]: e for e in call_json(url + "/api/status/deep")[1]["inventory"]}
    assert inventory["hrrr"]["expected_hours"] == list(range(19))  # 15z: to 18 h
    gfs = inventory["gfs"]["expected_hours"]
    assert len(gfs) == 209 and gfs[:121] == list(range(121)) and gfs[121:] == list(range(123, 385, 3))


def test_api_keeps_expected_hours_the_document_already_has(tmp_path: Path) -> None:
    doc = example()
    doc["inventory"][0]["expected_hours"] = [0, 1, 2]
    with served(write(tmp_path / "deep.json", doc)) as url:
        assert call_json(url + "/api/status/deep")[1]["inventory"][0]["expected_hours"] == [0, 1, 2]


def test_api_marks_an_old_document_stale(tmp_path: Path) -> None:
    with served(write(tmp_path / "deep.json", example(age_s=3600)), stale_after_s=600) as url:
        doc = call_json(url + "/api/status/deep")[1]
    assert doc["stale"] is True and 3599 <= doc["stale_s"] < 3700


def test_configured_dagster_url_replaces_the_documents(status_file: Path) -> None:
    with served(status_file, dagster_url="http://dagster.internal:3000/") as url:
        assert call_json(url + "/api/status/deep")[1]["dagster_url"] == "http://dagster.internal:3000"
    with served(status_file) as url:
        assert call_json(url + "/api/status/deep")[1]["dagster_url"] == "http://127.0.0.1:3000"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
    ],
    ids=["missing", "garbage", "not-an-object"],
)
def test_api_503_when_the_document_is_missing_or_unreadable(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "status" / "deep.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with served(path) as url:
        status, body = call_json(url + "/api/status/deep")
    assert status == 503
    assert message in body["error"] and str(path) in body["error"]


# -- GET /health --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("health", "age_s", "code", "reported"),
    [
        ("healthy", 5, 200, "healthy"),
        ("degraded", 5, 200, "degraded"),  # load balancers keep a degraded page in rotation
        ("unhealthy", 5, 503, "unhealthy"),
        ("healthy", 85, 200, "healthy"),  # within 3 x the writer's 30 s interval
        ("healthy", 95, 503, "stale"),  # three writes missed: the daemon is not writing
    ],
)
def test_health_codes(tmp_path: Path, health: str, age_s: float, code: int, reported: str) -> None:
    with served(write(tmp_path / "deep.json", example(age_s=age_s, health=health))) as url:
        status, body = call_json(url + "/health")
    assert (status, body["health"]) == (code, reported)
    if code == 503:
        assert body["reason"]
    if reported == "unhealthy":
        assert "1 of 12 runs failed" in body["reason"]  # the critical alert's message
    if reported == "stale":
        assert body["document_health"] == "healthy"


def test_a_document_without_its_interval_goes_stale_after_ten_minutes(tmp_path: Path) -> None:
    doc = example(age_s=9 * 60, health="healthy")
    del doc["status_interval_s"]
    with served(write(tmp_path / "deep.json", doc)) as url:
        assert call_json(url + "/health")[0] == 200
    doc = example(age_s=11 * 60, health="healthy")
    del doc["status_interval_s"]
    with served(write(tmp_path / "deep.json", doc)) as url:
        status, body = call_json(url + "/health")
    assert status == 503 and body["health"] == "stale" and "not writing" in body["reason"]


def test_health_stale_limit_is_configurable(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.json", example(age_s=120, health="healthy"))
    with served(path, stale_after_s=60) as url:
        assert call_json(url + "/health")[0] == 503
    with served(path, stale_after_s=300) as url:
        assert call_json(url + "/health")[0] == 200


@pytest.mark.parametrize("case", ["missing", "no-generated_at"])
def test_health_503_without_a_usable_document(tmp_path: Path, case: str) -> None:
    path = tmp_path / "deep.json"
    if case == "no-generated_at":
        doc = example(health="healthy")
        del doc["generated_at"]
        write(path, doc)
    with served(path) as url:
        status, body = call_json(url + "/health")
    assert (status, body["health"]) == (503, "unknown")
    assert body["reason"]


# -- GET /status --------------------------------------------------------------------------


def test_status_page_is_one_self_contained_html_document(status_file: Path) -> None:
    with served(status_file) as url:
        status, headers, body = call(url + "/status")
        assert call(url + "/")[0] == 200  # / redirects to the page
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for skeleton in ('id="metrics"', 'id="m-workers"', 'id="m-pending"', 'id="m-failure"', 'id="m-daemon"',
                     'id="m-generated"', 'id="alerts"', 'id="jobs-body"', 'id="matrix-body"', 'id="disk-body"',
                     'id="cache-age"', 'id="link-runs"', 'id="link-assets"', '"/api/status/deep"', "10000"):
        assert skeleton in page, skeleton
    # no external assets: nothing loaded from another origin, no stylesheet/script files
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"<link[^>]+stylesheet|<script[^>]+src", page, re.I)
    assert "@import" not in page and "url(" not in page
    # document strings are only ever inserted as text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", page)
    # and the CSP allows exactly the inline script that is there
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    assert "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'" in csp


# -- POST /api/runs/{run_id}/retry --------------------------------------------------------


def test_retry_reexecutes_the_failed_run_through_graphql(status_file: Path, fake_dagster: FakeDagster) -> None:
    with served(status_file, dagster_url="http://dagster.test:3000", graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 202
    assert body == {"run_id": FAILED_RUN, "new_run_id": NEW_RUN, "url": f"http://dagster.test:3000/runs/{NEW_RUN}"}
    lookup, children, mutation = fake_dagster.requests
    assert lookup["path"] == "/graphql" and lookup["variables"] == {"runId": FAILED_RUN}
    assert "dagster/parent_run_id" in children["query"] and children["variables"] == {"runId": FAILED_RUN}
    assert mutation["path"] == "/graphql" and mutation["content_type"] == "application/json"
    assert mutation["variables"] == {"parentRunId": FAILED_RUN}
    query = " ".join(mutation["query"].split())
    assert query.startswith("mutation ")
    assert "launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: ALL_STEPS})" in query
    assert "$parentRunId: String!" in query


def test_retry_mutation_error_is_a_502_naming_it(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.launch = {"__typename": "PythonError", "className": "DagsterUserCodeUnreachableError",
                           "message": "Could not reach user code server: gRPC UNAVAILABLE"}
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 502
    assert "PythonError" in body["error"] and "Could not reach user code server" in body["error"]
    assert FAILED_RUN in body["error"] and body["run_id"] == FAILED_RUN
    assert len(fake_dagster.mutations) == 1


def test_retry_graphql_request_errors_are_a_502(status_file: Path, fake_dagster: FakeDagster) -> None:
    invalid = {"data": None, "errors": [{"message": 'Cannot query field "runOrError" on type "Query".'}]}
    fake_dagster.respond = lambda body: (400, invalid)  # what dagster-webserver answers to an invalid query
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 502 and "Cannot query field" in body["error"]


def test_retry_of_an_unknown_run_is_a_404(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.run_status = None
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 404 and "no run" in body["error"] and FAILED_RUN in body["error"]
    assert fake_dagster.mutations == []


def test_retry_of_a_run_that_did_not_fail_is_a_409(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.run_status = "STARTED"
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 409 and "STARTED" in body["error"]
    assert fake_dagster.mutations == []


def test_retry_when_dagster_is_unreachable_is_a_502(status_file: Path) -> None:
    graphql = f"http://127.0.0.1:{free_port()}/graphql"
    with served(status_file, graphql_url=graphql) as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 502
    assert "unreachable" in body["error"] and graphql in body["error"]


def test_retry_when_dagster_is_too_slow_is_a_504(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.delay_s = 2.0
    with served(status_file, graphql_url=fake_dagster.url + "/graphql", graphql_timeout_s=0.5) as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 504 and "did not answer within 0.5 s" in body["error"]


def test_retry_graphql_url_defaults_to_the_dagster_url(tmp_path: Path, fake_dagster: FakeDagster) -> None:
    # from the server's dagster_url ...
    with served(write(tmp_path / "a.json", example()), dagster_url=fake_dagster.url) as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 202 and body["url"] == f"{fake_dagster.url}/runs/{NEW_RUN}"
    # ... else from the document's
    with served(write(tmp_path / "b.json", example(dagster_url=fake_dagster.url + "/"))) as url:
        assert call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)[0] == 202
    assert [r["path"] for r in fake_dagster.requests] == ["/graphql"] * 6
    # ... and without either there is nothing to call
    with served(write(tmp_path / "c.json", example(dagster_url=None))) as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 503 and "no Dagster URL" in body["error"]


def test_retry_refuses_cross_origin_requests_and_bad_ids(status_file: Path, fake_dagster: FakeDagster) -> None:
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", {**PAGE_HEADERS, "Origin": "http://evil.example"})
        assert status == 403 and "cross-origin" in body["error"]
        assert call_json(f"{url}/api/runs/not%20an%20id;drop/retry", "POST", PAGE_HEADERS)[0] == 400
        assert call(f"{url}/api/runs/{FAILED_RUN}/retry")[0] == 405  # GET does not retry
        # the page's own (same-origin) request goes through
        same = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", {**PAGE_HEADERS, "Origin": url})
        assert same[0] == 202
    assert len(fake_dagster.mutations) == 1


def test_retry_without_the_page_header_or_from_another_site_is_refused(status_file: Path, fake_dagster: FakeDagster) -> None:
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST")  # a cross-site form post
        assert status == 403 and "X-Weather-Pipeline" in body["error"]
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", {**PAGE_HEADERS, "Sec-Fetch-Site": "cross-site"})
        assert status == 403 and "cross-site" in body["error"]
    assert fake_dagster.requests == []


def test_three_clicks_launch_one_retry(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.delay_s = 0.2
    with served(status_file, dagster_url="http://dagster.test:3000", graphql_url=fake_dagster.url + "/graphql") as url:
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(
            call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert sorted(status for status, _ in results) == [202, 409, 409]
    assert len(fake_dagster.mutations) == 1
    for status, body in results:
        if status == 409:
            assert body["retried_as"] == NEW_RUN and "already retried" in body["error"]


def test_a_run_dagster_already_retried_is_not_retried_again(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.children = [{"runId": "earlier-retry", "status": "SUCCESS"}]
    with served(status_file, graphql_url=fake_dagster.url + "/graphql") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 409 and body["retried_as"] == "earlier-retry" and fake_dagster.mutations == []


def test_graphql_documents_are_valid_against_the_installed_dagster_schema() -> None:
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    schema = create_schema().graphql_schema
    for document in (status_app.RUN_QUERY, status_app.CHILDREN_QUERY, status_app.REEXECUTE_MUTATION,
                     status_app.REPOSITORIES_QUERY, status_app.LAUNCH_MUTATION):
        assert validate(schema, parse(document)) == [], document
    params = schema.get_type("ReexecutionParams").fields
    assert {"parentRunId", "strategy"} <= set(params)
    assert "ALL_STEPS" in schema.get_type("ReexecutionStrategy").values


def test_retry_when_the_url_is_not_a_graphql_endpoint_is_a_502(status_file: Path, fake_dagster: FakeDagster) -> None:
    fake_dagster.respond = lambda body: (404, "<html>Not Found</html>")
    with served(status_file, graphql_url=fake_dagster.url + "/nope") as url:
        status, body = call_json(f"{url}/api/runs/{FAILED_RUN}/retry", "POST", PAGE_HEADERS)
    assert status == 502 and "answered HTTP 404" in body["error"] and "/nope" in body["error"]


# -- against a real Dagster webserver -------------------------------------------------------

FAILING_DEFS = '''
import dagster as dg

@dg.op
def flaky_download():
    raise Exception("GRIB download failed: HTTP 503")

@dg.job
def failing_job():
    flaky_download()

@dg.asset(partitions_def=dg.StaticPartitionsDefinition(["a", "b"]))
def flaky_asset():
    raise Exception("GRIB download failed: HTTP 503")

defs = dg.Definitions(jobs=[failing_job], assets=[flaky_asset])
'''


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")  # gql, under DagsterGraphQLClient
def test_retry_reexecutes_a_failed_run_on_a_real_dagster_webserver(tmp_path: Path, status_file: Path) -> None:
    """The same route against dagster-webserver 1.13 (no fake): a launched run fails, Retry re-executes it."""
    from dagster import DagsterInstance, DagsterRunStatus
    from dagster_graphql import DagsterGraphQLClient

    from weather_pipeline.orchestration.local_daemon import _reset_signals, stop_process_group, wait_for

    home = tmp_path / "dagster_home"
    home.mkdir()
    # runs launch at once (no daemon needed to dequeue them)
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n")
    (tmp_path / "defs.py").write_text(FAILING_DEFS)
    port = free_port()
    dagster_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "webserver.log"
    with log.open("wb") as log_file:
        web = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"),
             "-h", "127.0.0.1", "-p", str(port), "-f", "defs.py"],
            cwd=tmp_path, env={**os.environ, "DAGSTER_HOME": str(home)}, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_reset_signals,
        )
    try:
        up = wait_for(lambda: web.poll() is None and _listening(port) and call(dagster_url + "/server_info")[0] == 200,
                      timeout=90, interval=0.3)
        assert up, f"dagster-webserver did not come up:\n{log.read_text()[-2000:]}"
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        finished = (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS, DagsterRunStatus.CANCELED)
        parent = client.submit_job_execution("failing_job")
        assert wait_for(lambda: client.get_run_status(parent) in finished, timeout=90, interval=0.3)
        assert client.get_run_status(parent) == DagsterRunStatus.FAILURE

        with served(status_file, dagster_url=dagster_url) as url:
            status, body = call_json(f"{url}/api/runs/{parent}/retry", "POST", PAGE_HEADERS)
            assert status == 202, body
            child = body["new_run_id"]
            assert child != parent and body["url"] == f"{dagster_url}/runs/{child}"
            # the re-execution has only just been launched: it is not retried again
            status, body = call_json(f"{url}/api/runs/{child}/retry", "POST", PAGE_HEADERS)
            assert status == 409, body
            assert call_json(f"{url}/api/runs/00000000-0000-4000-8000-000000000000/retry", "POST",
                             PAGE_HEADERS)[0] == 404
        assert wait_for(lambda: client.get_run_status(child) in finished, timeout=90, interval=0.3)
        # Dagster itself now knows the parent was retried: a fresh status server refuses a second one
        with served(status_file, dagster_url=dagster_url) as url:
            status, body = call_json(f"{url}/api/runs/{parent}/retry", "POST", PAGE_HEADERS)
            assert status == 409 and body["retried_as"] == child, body

        run = DagsterInstance.from_config(str(home)).get_run_by_id(child)
        assert run.parent_run_id == parent and run.root_run_id == parent and run.job_name == "failing_job"

        # A run launched by `dagster asset materialize` has no repository origin, so Dagster cannot
        # re-execute it: Retry launches its job, assets and partition afresh, as its retry.
        cli = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-f", "defs.py",
                              "--select", "flaky_asset", "--partition", "b"], cwd=tmp_path,
                             env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True, text=True, timeout=180)
        assert cli.returncode != 0
        instance = DagsterInstance.from_config(str(home))
        (cli_run,) = [r for r in instance.get_runs() if r.tags.get("dagster/partition") == "b"]
        with served(status_file, dagster_url=dagster_url) as url:
            status, body = call_json(f"{url}/api/runs/{cli_run.run_id}/retry", "POST", PAGE_HEADERS)
            assert status == 202, body
            again = call_json(f"{url}/api/runs/{cli_run.run_id}/retry", "POST", PAGE_HEADERS)
            assert again[0] == 409 and again[1]["retried_as"] == body["new_run_id"]
        assert wait_for(lambda: client.get_run_status(body["new_run_id"]) in finished, timeout=90, interval=0.3)
        retry = DagsterInstance.from_config(str(home)).get_run_by_id(body["new_run_id"])
        assert retry.tags["dagster/partition"] == "b" and retry.parent_run_id == cli_run.run_id
        assert {k.to_user_string() for k in retry.asset_selection} == {"flaky_asset"}
    finally:
        stop_process_group(web)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
