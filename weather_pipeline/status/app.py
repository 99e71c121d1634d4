"""The status server: the deep-status document over HTTP, a health probe, one page, and Retry.

A small Starlette app of our own (the Dagster webserver has no hook for custom routes) over the
deep-status document that the status writer keeps current at ``cache/status/deep.json``
(DESIGN.md section 5). The file is re-read on every request, so the server holds no state and
can be restarted at will. Routes:

``GET /api/status/deep``
    The document, plus ``stale_s`` (seconds since its ``generated_at``, server clock) and
    ``stale`` (``stale_s`` over the limit, or no readable ``generated_at``). For every
    ``inventory`` entry that lacks ``expected_hours``, the list of that run's forecast hours
    is added from the catalog (the page needs it to draw one cell per hour: GFS runs are hourly
    to 120 h, then 3-hourly). When the server was given a ``dagster_url``, it replaces the
    document's (it is the address the operator's browser can reach). The file is not touched.
    503 with ``{"error": ...}`` when the file is missing, unreadable or not a JSON object.
``GET /health``
    For load balancers and cron: 200 when the document is fresh and ``health`` is ``healthy``
    or ``degraded`` (degraded still serves: a missing tile is no reason to take the page out of
    rotation); 503 when it is ``unhealthy``, when the document is missing, unreadable or has no
    valid ``generated_at`` (``"health": "unknown"``), or when it is stale: older than 3 x the
    writer's ``status_interval_s`` (10 minutes for a document that does not say;
    ``stale_after_s`` overrides both; ``"health": "stale"``: the daemon is not writing, so its
    last verdict means nothing). The body always carries ``health`` and, on 503, ``reason``.
``GET /status``
    One self-contained HTML page (inline CSS and script, no external assets) that polls the
    API every 10 s. Every string from the document is inserted as text, never as markup.
``POST /api/runs/{run_id}/retry``
    Re-executes a finished, failed (or canceled) Dagster run, all steps, through Dagster's
    GraphQL API (:func:`reexecute_run`). 202 ``{"run_id", "new_run_id", "url"}``; otherwise a
    JSON ``{"error": ...}`` naming the problem: 400 bad run id, 403 cross-site request, 404 run
    not found, 409 run not in a retryable state or already retried (``retried_as`` names the
    re-execution: a run is retried once, however many times Retry is clicked), 502 Dagster
    unreachable or the mutation failed, 503 no Dagster URL configured, 504 Dagster did not
    answer in time.

What protects Retry, and what does not: the server binds loopback by default; Retry is a POST
that must carry the ``X-Weather-Pipeline: retry`` header (a cross-site form cannot set it, and
a cross-site script would need a CORS preflight this server never grants), an ``Origin`` (when
sent) naming this server, and no ``Sec-Fetch-Site`` other than same-origin. There is no
authentication: anyone who can reach the port can read the status and retry failed runs. Put
it behind your reverse proxy's authentication before binding anything but loopback.

:func:`serve` runs the app with uvicorn (``weather-pipeline serve-status``);
:class:`StatusServer` runs it in a background thread on a free port (tests, embedding).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from weather_pipeline.core.status import DEFAULT_STALE_AFTER_S, document_age_s, stale_limit_s

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8766
# a document older than 3 x its writer's interval is stale (core.status.stale_limit_s): /health
# answers 503 and the page says so (the writer missed three ticks in a row: the daemon is not writing)
#: how long a Retry waits for Dagster (launching a run can load the code location)
DEFAULT_GRAPHQL_TIMEOUT_S = 30.0
PAGE_PATH = Path(__file__).with_name("page.html")

#: Dagster run ids are UUIDs; accept anything id-like, refuse the rest before calling Dagster
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
#: finished runs that Retry may re-execute (the page offers it on FAILURE rows)
RETRYABLE_STATUSES = frozenset({"FAILURE", "CANCELED"})
#: the header a Retry request must carry (CSRF protection: cross-site forms cannot set it)
RETRY_HEADER, RETRY_HEADER_VALUE = "X-Weather-Pipeline", "retry"

#: re-executions already launched for a run (Dagster tags them with dagster/parent_run_id)
CHILDREN_QUERY = """
query WeatherStatusRunChildren($runId: String!) {
  runsOrError(filter: {tags: [{key: "dagster/parent_run_id", value: $runId}]}, limit: 5) {
    __typename
    ... on Runs { results { runId status } }
    ... on PythonError { message }
  }
}
""".strip()

#: looks the run up first, so "not found" and "still running" get their own answers; a run
#: without a repository origin (launched by `dagster asset materialize`) cannot be re-executed
#: by Dagster and is launched afresh from what it ran (job, assets, partition tags)
RUN_QUERY = """
query WeatherStatusRunForRetry($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      runId status jobName rootRunId
      repositoryOrigin { repositoryLocationName repositoryName }
      assetSelection { path }
      tags { key value }
    }
    ... on Error { message }
  }
}
""".strip()

#: where a job of that name can be launched (for runs without a repository origin)
REPOSITORIES_QUERY = """
query WeatherStatusRepositories {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
    ... on PythonError { message }
  }
}
""".strip()

LAUNCH_MUTATION = """
mutation WeatherStatusLaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on Error { message }
    ... on PythonError { className }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
""".strip()

#: tags a fresh launch must not inherit: Dagster's own bookkeeping of the failed run
_NOT_INHERITED = ("dagster/run_key", "dagster/sensor_name", "dagster/schedule_name", "dagster/backfill",
                  "dagster/parent_run_id", "dagster/root_run_id", "dagster/is_resume_retry",
                  "dagster/retry_number", "dagster/will_retry", "dagster/failure_reason", "dagster/auto_retry",
                  ".dagster/", "dagster/code_location", "dagster/user", "dagster/from_ui")

#: ``launchPipelineReexecution`` and ``launchRunReexecution`` are the same field in Dagster 1.13;
#: the former is what Dagster's own UI and Python client send.
REEXECUTE_MUTATION = """
mutation WeatherStatusRetryRun($parentRunId: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on Error { message }
    ... on PythonError { className }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
  }
}
""".strip()

_NO_STORE = {"Cache-Control": "no-store"}


# -- the document -------------------------------------------------------------------------


class StatusUnavailable(Exception):
    """The deep-status document cannot be served; the message says why."""


def read_status(path: Path) -> dict[str, Any]:
    """The document at ``path``, parsed; :class:`StatusUnavailable` if missing or unreadable."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise StatusUnavailable(
            f"deep status document {path} does not exist (is the deep_status sensor running?)"
        ) from None
    except OSError as exc:
        raise StatusUnavailable(f"cannot read deep status document {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise StatusUnavailable(f"deep status document {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StatusUnavailable(f"deep status document {path} is not a JSON object")
    return doc


def _expected_hours(model: Any, run: Any) -> list[int] | None:
    try:
        from weather_pipeline.core.catalog import load_catalog

        return list(load_catalog().model(str(model)).hours_for_run(str(run)))
    except Exception:  # an unknown model or run key, a broken overlay: the page falls back
        return None


def _with_expected_hours(inventory: Any) -> Any:
    if not isinstance(inventory, list):
        return inventory
    out = []
    for entry in inventory:
        if isinstance(entry, dict) and "expected_hours" not in entry:
            hours = _expected_hours(entry.get("model"), entry.get("run"))
            # only when it agrees with the document's own count (the catalog may have changed)
            if hours is not None and len(hours) == entry.get("hours_expected"):
                entry = {**entry, "expected_hours": hours}
        out.append(entry)
    return out


# -- retry through Dagster's GraphQL API ----------------------------------------------------


class RetryError(Exception):
    """A retry that did not launch; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AlreadyRetried(RetryError):
    """The run was re-executed already (``retried_as``); a second click launches nothing."""

    def __init__(self, run_id: str, retried_as: str) -> None:
        super().__init__(409, f"run {run_id} was already retried as {retried_as}")
        self.retried_as = retried_as


def _graphql(url: str, query: str, variables: dict[str, Any], timeout: float) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        # Dagster answers 400 for invalid queries and 500 when a resolver caught an exception
        # (a PythonError in "data"), both with a GraphQL body: read it like any other answer.
        payload = exc.read(1_000_000)
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = None
        if not (isinstance(answer, dict) and ("data" in answer or "errors" in answer)):
            detail = payload[:300].decode("utf-8", "replace")
            raise RetryError(502, f"Dagster GraphQL API at {url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
            raise RetryError(504, f"Dagster GraphQL API at {url} did not answer within {timeout:g} s") from None
        raise RetryError(502, f"Dagster is unreachable at {url}: {reason}") from None
    try:
        data = json.loads(payload)
    except ValueError:
        raise RetryError(502, f"{url} did not answer JSON: is it Dagster's GraphQL endpoint?") from None
    if not isinstance(data, dict):
        raise RetryError(502, f"{url} answered unexpected JSON: is it Dagster's GraphQL endpoint?")
    if data.get("errors"):
        messages = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in data["errors"])
        raise RetryError(502, f"Dagster rejected the GraphQL request: {messages[:500]}")
    return data.get("data") or {}


def reexecute_run(graphql_url: str, run_id: str, *, timeout: float = DEFAULT_GRAPHQL_TIMEOUT_S) -> str:
    """Re-execute Dagster run ``run_id`` (all steps); return the new run's id.

    Looks the run up with ``runOrError`` (404 if Dagster does not know it, 409 unless it is
    FAILURE or CANCELED, 409 if it was retried already), then sends
    ``launchPipelineReexecution(reexecutionParams: {parentRunId, strategy: ALL_STEPS})``; a run
    Dagster cannot re-execute (no repository origin: `dagster asset materialize`) is launched
    afresh with ``launchRun`` from its job, assets and tags, linked to it as its retry. Raises
    :class:`RetryError` with the HTTP status to
    answer and a message naming the problem.
    """
    found = _graphql(graphql_url, RUN_QUERY, {"runId": run_id}, timeout).get("runOrError") or {}
    kind = found.get("__typename")
    if kind == "RunNotFoundError":
        raise RetryError(404, f"Dagster has no run {run_id}")
    if kind != "Run":
        raise RetryError(502, f"Dagster could not look up run {run_id}: {found.get('message') or kind or 'no answer'}")
    status = found.get("status")
    if status not in RETRYABLE_STATUSES:
        raise RetryError(409, f"run {run_id} is {status}; only failed or canceled runs are retried")
    children = _graphql(graphql_url, CHILDREN_QUERY, {"runId": run_id}, timeout).get("runsOrError") or {}
    earlier = [r.get("runId") for r in children.get("results") or [] if r.get("runId")]
    if earlier:
        raise AlreadyRetried(run_id, str(earlier[0]))
    if not found.get("repositoryOrigin"):
        return _launch_afresh(graphql_url, found, timeout)

    result = _graphql(graphql_url, REEXECUTE_MUTATION, {"parentRunId": run_id}, timeout)
    return _launched(run_id, result.get("launchPipelineReexecution") or {})


def _launched(run_id: str, launched: dict[str, Any]) -> str:
    """The new run's id from a launch mutation's answer, or RetryError with Dagster's own words."""
    kind = launched.get("__typename")
    if kind == "LaunchRunSuccess":
        new_id = (launched.get("run") or {}).get("runId")
        if new_id:
            return str(new_id)
        raise RetryError(502, "Dagster reported a launched re-execution without a run id")
    if kind == "RunConfigValidationInvalid":
        detail = "; ".join(e.get("message", "") for e in launched.get("errors") or []) or "invalid run config"
    elif kind == "InvalidStepError":
        detail = f"invalid step {launched.get('invalidStepKey')}"
    elif kind == "InvalidOutputError":
        detail = f"invalid output {launched.get('invalidOutputName')} of step {launched.get('stepKey')}"
    else:
        detail = str(launched.get("message") or "no answer").strip()
    raise RetryError(502, f"Dagster did not re-execute run {run_id}: {kind or 'error'}: {detail[:500]}")


def _launch_afresh(graphql_url: str, run: dict[str, Any], timeout: float) -> str:
    """Launch the job, assets and partitions of a run Dagster cannot re-execute, as its retry."""
    run_id, job = str(run.get("runId")), str(run.get("jobName"))
    answer = _graphql(graphql_url, REPOSITORIES_QUERY, {}, timeout).get("repositoriesOrError") or {}
    homes = [(r["location"]["name"], r["name"]) for r in answer.get("nodes") or []
             if any(j.get("name") == job for j in r.get("jobs") or [])]
    if not homes:
        raise RetryError(502, f"no code location that Dagster serves has job {job!r} of run {run_id}")
    location, repository = homes[0]
    tags = [t for t in run.get("tags") or [] if not any(str(t.get("key", "")).startswith(p) for p in _NOT_INHERITED)]
    root = run.get("rootRunId") or run_id
    tags += [{"key": "dagster/parent_run_id", "value": run_id}, {"key": "dagster/root_run_id", "value": root}]
    selector: dict[str, Any] = {"repositoryLocationName": location, "repositoryName": repository, "jobName": job}
    if run.get("assetSelection"):
        selector["assetSelection"] = [{"path": a["path"]} for a in run["assetSelection"]]
    params = {"selector": selector, "executionMetadata": {"tags": tags, "parentRunId": run_id, "rootRunId": root}}
    result = _graphql(graphql_url, LAUNCH_MUTATION, {"executionParams": params}, timeout)
    return _launched(run_id, result.get("launchRun") or {})


# -- the app ------------------------------------------------------------------------------


def _csp_hashes(page: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in blocks
    )


def _safe_base_url(url: Any) -> str | None:
    if isinstance(url, str) and urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc:
        return url.rstrip("/")
    return None


def create_app(
    status_path: Path,
    *,
    dagster_url: str | None = None,
    graphql_url: str | None = None,
    stale_after_s: float | None = None,
    graphql_timeout_s: float = DEFAULT_GRAPHQL_TIMEOUT_S,
) -> Starlette:
    """The status app over the document at ``status_path`` (routes: see the module docstring).

    ``dagster_url`` is the Dagster UI base URL for links and Retry; without it the document's
    own ``dagster_url`` is used. ``graphql_url`` defaults to ``{dagster_url}/graphql``.
    """
    status_path = Path(status_path)
    fixed_stale_after = stale_after_s  # None: from each document's own interval
    configured_dagster = _safe_base_url(dagster_url) if dagster_url else None
    if dagster_url and configured_dagster is None:
        raise ValueError(f"dagster_url must be an http(s) URL, not {dagster_url!r}")
    page = PAGE_PATH.read_text(encoding="utf-8")
    page_headers = {
        **_NO_STORE,
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {_csp_hashes(page, 'script')}; "
            f"style-src {_csp_hashes(page, 'style')}; connect-src 'self'; img-src data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=_NO_STORE)

    async def api_deep(request: Request) -> Response:
        try:
            doc = await run_in_threadpool(read_status, status_path)
        except StatusUnavailable as exc:
            return error(503, str(exc), status_path=str(status_path))
        age = document_age_s(doc)
        limit = fixed_stale_after if fixed_stale_after is not None else stale_limit_s(doc, DEFAULT_STALE_AFTER_S)
        doc["stale_s"] = None if age is None else round(age, 1)
        doc["stale"] = age is None or age > limit
        doc["stale_after_s"] = limit
        if configured_dagster:
            doc["dagster_url"] = configured_dagster
        if "inventory" in doc:
            doc["inventory"] = _with_expected_hours(doc["inventory"])
        return JSONResponse(doc, headers=_NO_STORE)

    async def health(request: Request) -> Response:
        try:
            doc = await run_in_threadpool(read_status, status_path)
        except StatusUnavailable as exc:
            return JSONResponse({"health": "unknown", "reason": str(exc)}, status_code=503, headers=_NO_STORE)
        verdict = doc.get("health")
        age = document_age_s(doc)
        body: dict[str, Any] = {
            "health": verdict,
            "generated_at": doc.get("generated_at"),
            "stale_s": None if age is None else round(age, 1),
        }
        if age is None:
            reason = "the deep status document has no valid generated_at"
            return JSONResponse({**body, "health": "unknown", "reason": reason}, status_code=503, headers=_NO_STORE)
        limit = fixed_stale_after if fixed_stale_after is not None else stale_limit_s(doc, DEFAULT_STALE_AFTER_S)
        if age > limit:
            reason = (f"the deep status document is {age:.0f} s old (limit {limit:.0f} s, 3 x its writer's "
                      "interval): the daemon is not writing it")
            return JSONResponse({**body, "health": "stale", "document_health": verdict, "reason": reason},
                                status_code=503, headers=_NO_STORE)
        if verdict in ("healthy", "degraded"):
            return JSONResponse(body, headers=_NO_STORE)
        if verdict == "unhealthy":
            alerts = doc.get("alerts") if isinstance(doc.get("alerts"), list) else []
            critical = [a.get("message") for a in alerts if isinstance(a, dict) and a.get("level") == "critical"]
            reason = "; ".join(str(m) for m in critical) or "the deep status says unhealthy"
            return JSONResponse({**body, "reason": reason}, status_code=503, headers=_NO_STORE)
        return JSONResponse({**body, "health": "unknown", "reason": f"unknown health value {verdict!r}"},
                            status_code=503, headers=_NO_STORE)

    async def status_page(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    async def root(request: Request) -> Response:
        return RedirectResponse("/status", status_code=307)

    #: run id -> the re-execution launched from here: a double click never reaches Dagster twice
    launched: dict[str, str] = {}
    launch_lock = threading.Lock()

    async def retry(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if not _RUN_ID_RE.fullmatch(run_id):
            return error(400, f"{run_id[:80]!r} is not a Dagster run id")
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return error(403, f"cross-origin retry from {origin[:200]} refused", run_id=run_id)
        site = request.headers.get("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            return error(403, f"cross-site retry refused (Sec-Fetch-Site: {site[:40]})", run_id=run_id)
        if request.headers.get(RETRY_HEADER.lower()) != RETRY_HEADER_VALUE:
            return error(403, f"retry refused: the request lacks the {RETRY_HEADER}: {RETRY_HEADER_VALUE} header "
                              "(cross-site request protection)", run_id=run_id)
        base = configured_dagster
        if base is None and graphql_url is None:
            try:
                base = _safe_base_url((await run_in_threadpool(read_status, status_path)).get("dagster_url"))
            except StatusUnavailable:
                base = None
        endpoint = graphql_url or (f"{base}/graphql" if base else None)
        if endpoint is None:
            return error(503, "no Dagster URL configured (pass dagster_url, or the document must carry one)",
                         run_id=run_id)
        def launch_once() -> str:
            with launch_lock:  # concurrent clicks wait here, then find the first one's run
                if run_id in launched:
                    raise AlreadyRetried(run_id, launched[run_id])
                new = reexecute_run(endpoint, run_id, timeout=graphql_timeout_s)
                launched[run_id] = new
                return new

        try:
            new_id = await run_in_threadpool(launch_once)
        except AlreadyRetried as exc:
            return error(409, exc.message, run_id=run_id, retried_as=exc.retried_as,
                         url=f"{base}/runs/{quote(exc.retried_as)}" if base else None)
        except RetryError as exc:
            return error(exc.status, exc.message, run_id=run_id, graphql_url=endpoint)
        url = f"{base}/runs/{quote(new_id)}" if base else None
        return JSONResponse({"run_id": run_id, "new_run_id": new_id, "url": url}, status_code=202,
                            headers=_NO_STORE)

    return Starlette(
        routes=[
            Route("/", root),
            Route("/status", status_page),
            Route("/api/status/deep", api_deep),
            Route("/health", health),
            Route("/api/runs/{run_id}/retry", retry, methods=["POST"]),
        ]
    )


# -- serving ------------------------------------------------------------------------------


def serve(
    status_path: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    dagster_url: str | None = None,
    graphql_url: str | None = None,
    stale_after_s: float | None = None,
    log_level: str = "info",
) -> None:
    """Serve the status app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(status_path, dagster_url=dagster_url, graphql_url=graphql_url, stale_after_s=stale_after_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class StatusServer:
    """An app served by uvicorn in a background thread; ``port=0`` picks a free port.

    The socket is bound in the constructor, so :attr:`url` is known before :meth:`start`.
    Use as a context manager.
    """

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, *, log_level: str = "warning") -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> "StatusServer":
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="status-server", daemon=True
        )
        self._thread.start()
        self._thread.join(0.01)
        deadline = 200  # x 0.05 s
        while not self._server.started and self._thread.is_alive() and deadline:
            self._thread.join(0.05)
            deadline -= 1
        if not self._server.started:
            self.stop()
            raise RuntimeError("the status server did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> "StatusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
