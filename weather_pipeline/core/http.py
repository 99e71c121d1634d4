"""HTTP access to NOAA sources: one pooled session, timeouts, retries, rate limits, checks.

Libraries, and why:
- requests: connection pooling (HTTP keep-alive) through one Session per client.
- tenacity: the retry loop (exponential backoff with jitter, stop after N attempts). Every
  attempt goes through our own code, so each one passes the rate limiter and is counted;
  urllib3's built-in Retry would retry inside the adapter, invisible to both.
- pyrate-limiter (SQLite bucket + file lock): a sliding-window limit per host shared by every
  process on the machine, which is what NOMADS counts (it blocks an IP, not a process).
- pybreaker: a circuit breaker per server (scheme://host:port). A server that cannot be reached
  (connection refused, no DNS, connect timeout) `breaker_failures` times in a row is answered
  at once with CircuitOpen for `breaker_cooldown_s` instead of being hammered; after that one
  trial request decides. Chosen because it is small, thread-safe, counts only the exceptions
  we say count, and has a Redis-backed state storage for when several machines must share it.

What a failure means is in its type, so callers never guess from a message:
- NotFound: the source answered and does not have the file (404/403): try the next source.
- Unreachable (a TransientError): the server did not answer at all; CircuitOpen (a subclass,
  never retried) while its breaker is open. Never to be read as "not published".
- TransientError: worth another attempt (429/5xx, a dropped or stalled transfer, a short body,
  a failed content check).
- RetryLater: the server asked us to wait longer than we may sleep (Retry-After over
  `max_retry_after`); `until` says when to come back. The server is not asked again before.
- any other FetchError is permanent for this request: a bad URL, a refused redirect, a response
  over its size cap, another 4xx.

Every transfer has an overall deadline besides the socket timeouts (`transfer_grace_s` plus the
expected size at `min_transfer_rate`), so a body trickling in a byte at a time cannot hold a
worker for hours, and bodies are read in single system calls so signals are handled promptly.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterator, Mapping
from urllib.parse import urlsplit

import pybreaker
import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from weather_pipeline.core.idx import ByteRange

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 20


class FetchError(Exception):
    """A request that failed for good; the message names the URL."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class NotFound(FetchError):
    """The source does not have this file (404, or 403 from a bucket without listing)."""


class RangeIgnored(FetchError):
    """The server answered a Range request with the whole file and full downloads are off."""


class ResponseTooLarge(FetchError):
    """A response over its size cap; refused before (or while) reading it."""


class RedirectRefused(FetchError):
    """A redirect to another host or a weaker scheme that the configuration does not allow."""


class TransientError(FetchError):
    """Worth retrying: 429/5xx, a dropped connection, a timeout, a short or corrupt body."""

    def __init__(self, url: str, reason: str, retry_after: float | None = None):
        super().__init__(url, reason)
        self.retry_after = retry_after


class Unreachable(TransientError):
    """The server did not answer: connection refused, no DNS, or the connect timed out."""

    def __init__(self, url: str, reason: str, server: str):
        super().__init__(url, reason)
        self.server = server


class CircuitOpen(Unreachable):
    """The server's circuit breaker is open: answered at once, without a request."""

    def __init__(self, url: str, server: str, until: datetime, cause: str | None):
        reason = (f"{server} is unreachable (circuit open until {until:%H:%M:%S}Z"
                  + (f"; last error: {cause}" if cause else "") + ")")
        super().__init__(url, reason, server)
        self.until = until


class Aborted(FetchError):
    """The client was aborted (`HttpClient.abort`: the caller is being interrupted); not retried."""


class RetryLater(FetchError):
    """The server asked to wait longer than the client may sleep; come back at `until`."""

    def __init__(self, url: str, reason: str, until: datetime):
        super().__init__(url, reason)
        self.until = until


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_wait: float = 1.0  # seconds before the 2nd attempt, doubled each time after
    max_wait: float = 60.0
    jitter: float = 1.0  # up to this many seconds added at random, so clients do not sync up
    max_retry_after: float = 300.0  # a longer Retry-After fails the request with RetryLater


@dataclass(frozen=True)
class HttpConfig:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: requests per window (a minute by default), by host name; hosts not named are not limited.
    rate_limits: Mapping[str, int] = field(default_factory=dict)
    rate_window_s: float = 60.0
    #: where the shared rate-limit bucket lives; machine-wide by default on purpose.
    rate_limit_db: Path = field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "weather-pipeline-ratelimit.sqlite"
    )
    user_agent: str = "weather-pipeline/0.1 (+https://github.com/; NOAA open data cache)"
    #: consecutive "unreachable" failures that open a server's circuit, and for how long
    breaker_failures: int = 3
    breaker_cooldown_s: float = 60.0
    #: hosts a redirect may lead to besides the requested host (the catalog's `redirect_hosts`)
    redirect_hosts: frozenset[str] = frozenset()
    #: the largest body accepted when the caller names no cap (whole-file downloads: GFS 0.25
    #: files are about 540 MB)
    max_body_bytes: int = 2 << 30
    #: overall deadline of one transfer: this, plus its expected size at `min_transfer_rate`
    transfer_grace_s: float = 60.0
    min_transfer_rate: float = 256 * 1024
    #: requests in flight at once to one server from this process, whatever the threads: the
    #: concurrency of an hour's ranges and a batch's hours stays polite (FastHerbie opens up to 50)
    max_connections_per_host: int = 8


@dataclass
class FetchStats:
    """What a client has cost so far: every attempt counts, including failed ones."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    waited_for_rate_limit: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, nbytes: int = 0, retries: int = 0, waited: float = 0.0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries
            self.waited_for_rate_limit += waited


_slots_lock = threading.Lock()
_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def _host_slots(server: str, limit: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore bounding requests in flight to one server."""
    with _slots_lock:
        key = (server, max(1, limit))
        if key not in _slots:
            _slots[key] = threading.BoundedSemaphore(key[1])
        return _slots[key]


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def server_of(url: str) -> str:
    """`https://host:port` of a URL: the unit that circuit breakers and wait orders apply to."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# ------------------------------------------------------------------------------------------
# Per-server state shared by every client of this process: circuit breakers, wait orders
# ------------------------------------------------------------------------------------------


class _BreakerMemory(pybreaker.CircuitBreakerListener):
    """Keeps the last failure of a breaker, so CircuitOpen can say what happened."""

    def __init__(self) -> None:
        self.last_error: str | None = None

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.last_error = getattr(exc, "reason", None) or str(exc)

    def state_change(self, cb, old_state, new_state) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            log.warning("%s is unreachable: circuit open for %.0f s (%s)", cb.name, cb.reset_timeout, self.last_error)
        elif new_state.name == pybreaker.STATE_CLOSED and old_state is not None:
            log.info("%s answers again: circuit closed", cb.name)


@dataclass
class _Server:
    breaker: pybreaker.CircuitBreaker
    memory: _BreakerMemory
    wait_until: datetime | None = None  # a Retry-After we could not honour in-process
    wait_reason: str | None = None


_servers: dict[tuple[str, int, float], _Server] = {}
_servers_lock = threading.Lock()


def _server_state(server: str, failures: int, cooldown: float) -> _Server:
    key = (server, failures, cooldown)
    with _servers_lock:
        state = _servers.get(key)
        if state is None:
            memory = _BreakerMemory()
            breaker = pybreaker.CircuitBreaker(
                fail_max=failures,
                reset_timeout=cooldown,
                # only a server that does not answer counts; a 404 or a 503 is an answer
                exclude=[lambda exc: not isinstance(exc, Unreachable)],
                listeners=[memory],
                name=server,
                throw_new_error_on_trip=False,
            )
            state = _servers[key] = _Server(breaker, memory)
        return state


def reset_server_states() -> None:
    """Forget every breaker and wait order of this process (tests; a config reload)."""
    with _servers_lock:
        _servers.clear()


def server_health() -> dict[str, dict[str, object]]:
    """What this process knows of each server it talked to: breaker state, wait orders."""
    out: dict[str, dict[str, object]] = {}
    with _servers_lock:
        items = list(_servers.items())
    for (server, _f, _c), state in items:
        out[server] = {
            "circuit": state.breaker.current_state,
            "failures": state.breaker.fail_counter,
            "last_error": state.memory.last_error,
            "wait_until": state.wait_until.isoformat() if state.wait_until else None,
        }
    return out


# ------------------------------------------------------------------------------------------
# The rate limiter
# ------------------------------------------------------------------------------------------


class _HostLimiter:
    """A per-host sliding-window limiter shared across processes through one SQLite file."""

    _cache: dict[tuple[str, str, int, float], "_HostLimiter"] = {}
    _cache_lock = threading.Lock()

    def __init__(self, db_path: Path, host: str, limit: int, window_s: float):
        from pyrate_limiter import Duration, Limiter, Rate, SQLiteBucket

        db_path.parent.mkdir(parents=True, exist_ok=True)
        # One table per host and window, so a test's short window never mixes with real limits.
        table = "rl_" + re.sub(r"[^A-Za-z0-9]", "_", f"{host}_{limit}_{window_s:g}")
        bucket = SQLiteBucket.init_from_file(
            [Rate(limit, int(window_s * 1000))], table=table, db_path=str(db_path), use_file_lock=True
        )
        # Block (sleep) until a slot is free, for up to 10 minutes; never drop a request.
        self._limiter = Limiter(
            bucket, raise_when_fail=False, max_delay=10 * Duration.MINUTE, retry_until_max_delay=True
        )
        self.host = host
        self._lock = threading.Lock()

    @classmethod
    def get(cls, db_path: Path, host: str, limit: int, window_s: float) -> "_HostLimiter":
        key = (str(db_path), host, limit, window_s)
        with cls._cache_lock:
            if key not in cls._cache:
                cls._cache[key] = cls(db_path, host, limit, window_s)
            return cls._cache[key]

    def acquire(self) -> float:
        t0 = time.monotonic()
        # one thread at a time per bucket: pyrate-limiter's file lock is per thread, its
        # connection is shared; a thread waiting for a slot holds the others, as the limit wants
        with self._lock:
            acquired = self._limiter.try_acquire(self.host)
        if not acquired:
            raise FetchError(self.host, "rate limiter: no request slot within 10 minutes")
        return time.monotonic() - t0


# ------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------


class HttpClient:
    """One pooled session with the retry, rate-limit, breaker and Range rules of this project."""

    def __init__(self, config: HttpConfig | None = None, *, sleep: Callable[[float], None] = time.sleep):
        self.config = config or HttpConfig()
        self.stats = FetchStats()
        self._meter = threading.local()  # per-thread extra counters (`metered`)
        self._aborted = threading.Event()
        self._sleep = sleep
        self._session = requests.Session()
        # Retries are ours (see module docstring), so the adapter must not retry by itself.
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=16, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = self.config.user_agent

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def metered(self, meter: FetchStats | None = None) -> Iterator[FetchStats]:
        """Count this thread's requests in `meter` too (a fresh one by default), besides `stats`:
        what one hour cost while other threads use the same client. Pass the same meter to the
        threads working for one caller."""
        previous = getattr(self._meter, "stats", None)
        self._meter.stats = meter = meter if meter is not None else FetchStats()
        try:
            yield meter
        finally:
            self._meter.stats = previous

    def abort(self) -> None:
        """Make every transfer of this client, in any thread, stop at its next chunk (`Aborted`):
        an interrupt of the main thread (SIGTERM, Ctrl-C) must not wait for helper threads'
        slow downloads. Aborted clients stay aborted."""
        self._aborted.set()

    def _check_abort(self, url: str) -> None:
        if self._aborted.is_set():
            raise Aborted(url, "aborted: the caller was interrupted")

    def current_meter(self) -> FetchStats | None:
        """The meter this thread counts in (`metered`), to hand to helper threads."""
        return getattr(self._meter, "stats", None)

    def _count(self, **counts) -> None:
        self.stats.add(**counts)
        meter = getattr(self._meter, "stats", None)
        if meter is not None:
            meter.add(**counts)

    # -- public API ----------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        """HEAD the URL: True if present, False on 404/403; retries transient failures.

        An unreachable server raises Unreachable: "cannot tell" is not "absent".
        """
        try:
            self._with_retries(url, lambda: self._head_once(url))
            return True
        except NotFound:
            return False

    def get_text(self, url: str, *, max_bytes: int | None = None) -> str:
        return self.get_bytes(url, max_bytes=max_bytes).decode("utf-8", errors="replace")

    def get_bytes(
        self,
        url: str,
        byte_range: ByteRange | None = None,
        *,
        allow_full: bool = False,
        validate: Callable[[bytes], None] | None = None,
        max_bytes: int | None = None,
    ) -> bytes:
        """GET a URL (or one byte range of it) whole and checked, with retries.

        `validate` runs on the body; a ValueError from it counts as a corrupt transfer and is
        retried like a dropped connection (the bytes on the server are presumed good).
        `max_bytes` caps the body (default `config.max_body_bytes`); an open-ended range
        whose answer would exceed it is refused before its body is read.
        """
        cap = self.config.max_body_bytes if max_bytes is None else max_bytes
        return self._with_retries(url, lambda: self._get_once(url, byte_range, allow_full, validate, cap))

    def download(self, url: str, dest: Path, *, progress: Callable[[int, int | None], None] | None = None,
                 max_bytes: int | None = None) -> int:
        """Stream a whole file to `dest` (not atomically: callers write to a temp name)."""
        cap = self.config.max_body_bytes if max_bytes is None else max_bytes
        return self._with_retries(url, lambda: self._download_once(url, dest, progress, cap))

    # -- one attempt each ----------------------------------------------------------------
    def _before_request(self, url: str) -> None:
        self._check_abort(url)
        host = urlsplit(url).hostname or ""
        limit = self.config.rate_limits.get(host)
        waited = 0.0
        if limit:
            waited = _HostLimiter.get(self.config.rate_limit_db, host, int(limit), self.config.rate_window_s).acquire()
        self._count(requests=1, waited=waited)

    def _timeouts(self) -> tuple[float, float]:
        return (self.config.connect_timeout, self.config.read_timeout)

    def _server(self, url: str) -> _Server:
        return _server_state(server_of(url), self.config.breaker_failures, self.config.breaker_cooldown_s)

    def _request(self, method: str, url: str, headers: dict[str, str] | None) -> requests.Response:
        """One HTTP request through the server's breaker; connection failures classified."""
        try:
            server = server_of(url)
        except ValueError as exc:
            raise FetchError(url, f"malformed URL: {exc}") from None
        state = self._server(url)
        now = datetime.now(timezone.utc)
        if state.wait_until and now < state.wait_until:
            raise RetryLater(url, f"{server} asked us to wait until {state.wait_until:%Y-%m-%d %H:%M:%S}Z "
                                  f"({state.wait_reason})", state.wait_until)

        def attempt() -> requests.Response:
            self._before_request(url)
            try:
                return self._session.request(
                    method, url, headers=headers, stream=True, timeout=self._timeouts(), allow_redirects=False
                )
            except requests.ConnectTimeout:
                raise Unreachable(url, f"connect timed out after {self.config.connect_timeout:g} s", server) from None
            except requests.ConnectionError as exc:
                if _never_connected(exc):
                    raise Unreachable(url, f"cannot connect: {_root_cause(exc)}", server) from None
                raise TransientError(url, f"connection failed: {_root_cause(exc)}") from None
            except requests.Timeout as exc:
                raise TransientError(url, f"timed out ({exc.__class__.__name__})") from None
            except (requests.RequestException, ValueError) as exc:  # InvalidSchema, InvalidURL: our input
                raise FetchError(url, f"cannot request it: {exc.__class__.__name__}: {exc}") from None

        # Not `breaker.call(attempt)`: pybreaker holds the breaker's lock for the whole call, so
        # every request to a server would wait for the one before it. The breaker is asked
        # before the request and told its outcome after, each under its lock for an instant.
        breaker = state.breaker
        opened = breaker._state_storage.opened_at
        if breaker.current_state == pybreaker.STATE_OPEN and opened:
            until = opened + timedelta(seconds=breaker.reset_timeout)
            if now < until:
                raise CircuitOpen(url, server, until, state.memory.last_error)
        try:
            resp = attempt()
        except Exception as exc:  # noqa: BLE001 - told to the breaker, which re-raises it
            outcome = exc
        else:
            outcome = None
        try:
            breaker.call(_outcome, outcome)
        except pybreaker.CircuitBreakerError:
            opened = breaker._state_storage.opened_at or now
            until = opened + timedelta(seconds=breaker.reset_timeout)
            raise CircuitOpen(url, server, until, state.memory.last_error) from None
        return resp

    def _send(self, method: str, url: str, headers: dict[str, str] | None = None) -> requests.Response:
        resp = self._request(method, url, headers)
        # Redirects are followed by hand so that each hop is checked, rate limited and counted.
        hops = 0
        while resp.is_redirect:
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise TransientError(url, f"HTTP {resp.status_code} without a Location header")
            if hops >= 5:
                raise FetchError(url, "more than 5 redirects")
            target = requests.compat.urljoin(resp.url, location)
            self._check_redirect(url, target)
            url = target
            resp = self._request(method, url, headers)
            hops += 1
        self._raise_for_status(url, resp, headers)
        return resp

    def _check_redirect(self, url: str, target: str) -> None:
        old, new = urlsplit(url), urlsplit(target)
        if new.scheme not in ("http", "https"):
            raise RedirectRefused(url, f"redirect to {target[:200]!r} refused: not http(s)")
        if old.scheme == "https" and new.scheme != "https":
            raise RedirectRefused(url, f"redirect to {target[:200]!r} refused: it drops https")
        if (new.hostname or "") != (old.hostname or "") and (new.hostname or "") not in self.config.redirect_hosts:
            allowed = ", ".join(sorted(self.config.redirect_hosts)) or "none"
            raise RedirectRefused(url, f"redirect to another host {new.hostname!r} refused "
                                       f"(allowed by the catalog's redirect_hosts: {allowed})")

    def _raise_for_status(self, url: str, resp: requests.Response, headers: dict[str, str] | None) -> None:
        code = resp.status_code
        if code < 400:
            return
        resp.close()
        if code in (403, 404):
            raise NotFound(url, f"HTTP {code}: the source does not have this file")
        if code == 416:
            asked = (headers or {}).get("Range", "?")
            size = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
            raise FetchError(url, f"HTTP 416 Range Not Satisfiable: asked for {asked} but the file "
                                  f"has {size or 'fewer'} bytes (the .idx does not describe this file)")
        if code in RETRY_STATUSES:
            wait = _parse_retry_after(resp.headers.get("Retry-After"))
            if wait is not None and wait > self.config.retry.max_retry_after:
                until = datetime.now(timezone.utc) + timedelta(seconds=wait)
                state = self._server(url)
                state.wait_until, state.wait_reason = until, f"HTTP {code} with Retry-After {wait:.0f} s"
                raise RetryLater(url, f"HTTP {code}: the server asks us to wait {wait:.0f} s, until "
                                      f"{until:%Y-%m-%d %H:%M:%S}Z; not asking again before", until)
            raise TransientError(url, f"HTTP {code}", wait)
        raise FetchError(url, f"HTTP {code}")

    def _head_once(self, url: str) -> None:
        self._send("HEAD", url).close()

    def _deadline(self, expected: int | None) -> float:
        size = expected if expected is not None else 0
        return time.monotonic() + self.config.transfer_grace_s + size / self.config.min_transfer_rate

    def _read_body(self, url: str, resp: requests.Response, expected: int | None, cap: int) -> bytes:
        """The body, read in single system calls against the transfer's deadline and cap."""
        deadline = self._deadline(expected)
        limit = cap if expected is None else expected
        buf = bytearray()
        try:
            while True:
                chunk = resp.raw.read1(CHUNK, decode_content=False)
                self._check_abort(url)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    break
                if time.monotonic() > deadline:
                    raise TransientError(url, f"transfer too slow: {len(buf)} of {expected or '?'} bytes after "
                                              f"{self.config.transfer_grace_s + (expected or 0) / self.config.min_transfer_rate:.0f} s")
        except FetchError:
            raise
        except Exception as exc:  # urllib3's ProtocolError, socket errors, timeouts mid-body
            raise TransientError(url, f"body interrupted: {exc.__class__.__name__}: {exc}") from None
        finally:
            resp.close()
            self._count(nbytes=len(buf))
        if expected is None and len(buf) > cap:
            raise ResponseTooLarge(url, f"response over the {cap} byte cap")
        if expected is not None and len(buf) != expected:
            raise TransientError(url, f"short body: got {len(buf)} of {expected} bytes")
        return bytes(buf)

    def _get_once(
        self,
        url: str,
        byte_range: ByteRange | None,
        allow_full: bool,
        validate: Callable[[bytes], None] | None,
        cap: int,
    ) -> bytes:
        headers = {"Range": byte_range.header} if byte_range else None
        # Ask for identity encoding: byte offsets from the .idx refer to the raw file.
        headers = {**(headers or {}), "Accept-Encoding": "identity"}
        resp = self._send("GET", url, headers)
        declared = _content_length(resp)
        if byte_range is None:
            if declared is not None and declared > cap:
                resp.close()
                raise ResponseTooLarge(url, f"the server announces {declared} bytes, over the {cap} byte cap")
            body = self._read_body(url, resp, declared, cap)
        elif resp.status_code == 206:
            first, last, total = _content_range(url, resp)
            want_last = byte_range.end if byte_range.end is not None else total - 1
            if first != byte_range.start or (total is not None and last != min(want_last, total - 1)):
                resp.close()
                raise FetchError(url, f"asked for {byte_range.header}, server sent bytes {first}-{last}/{total}")
            if last - first + 1 > cap:
                resp.close()
                raise ResponseTooLarge(url, f"{byte_range.header} is {last - first + 1} bytes, over the {cap} byte "
                                            "cap for this request")
            body = self._read_body(url, resp, last - first + 1, cap)
        elif resp.status_code == 200:
            if not allow_full:
                # Close without reading: a ignored Range must not silently cost the whole file.
                resp.close()
                raise RangeIgnored(url, f"server ignored Range {byte_range.header} and sent the whole file "
                                        f"({declared if declared is not None else 'unknown'} bytes); "
                                        "full downloads are not allowed for this request")
            if declared is not None and declared > self.config.max_body_bytes:
                resp.close()
                raise ResponseTooLarge(url, f"the server ignored Range and announces {declared} bytes, over the "
                                            f"{self.config.max_body_bytes} byte cap")
            whole = self._read_body(url, resp, declared, self.config.max_body_bytes)
            end = byte_range.end + 1 if byte_range.end is not None else len(whole)
            body = whole[byte_range.start:end]
        else:
            resp.close()
            raise FetchError(url, f"unexpected HTTP {resp.status_code} to a Range request")
        if validate is not None:
            try:
                validate(body)
            except ValueError as exc:
                raise TransientError(url, f"content check failed: {exc}") from None
        return body

    def _download_once(self, url: str, dest: Path, progress: Callable[[int, int | None], None] | None,
                       cap: int) -> int:
        resp = self._send("GET", url, {"Accept-Encoding": "identity"})
        declared = _content_length(resp)
        if declared is not None and declared > cap:
            resp.close()
            raise ResponseTooLarge(url, f"the server announces {declared} bytes, over the {cap} byte cap")
        deadline = self._deadline(declared)
        done = 0
        try:
            with open(dest, "wb") as fh:
                while True:
                    chunk = resp.raw.read1(CHUNK, decode_content=False)
                    self._check_abort(url)
                    if not chunk:
                        break
                    fh.write(chunk)
                    done += len(chunk)
                    if done > cap:
                        raise ResponseTooLarge(url, f"response over the {cap} byte cap")
                    if time.monotonic() > deadline:
                        raise TransientError(url, f"transfer too slow: {done} of {declared or '?'} bytes")
                    if progress:
                        progress(done, declared)
        except (FetchError, OSError) as exc:
            if isinstance(exc, FetchError) or _is_local_write_error(exc):
                raise
            raise TransientError(url, f"download interrupted after {done} bytes: {exc}") from None
        except Exception as exc:
            raise TransientError(url, f"download interrupted after {done} bytes: {exc}") from None
        finally:
            resp.close()
            self._count(nbytes=done)
        if declared is not None and done != declared:
            raise TransientError(url, f"short body: got {done} of {declared} bytes")
        return done

    # -- the retry loop ------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        policy = self.config.retry
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, policy.max_retry_after) + random.uniform(0, policy.jitter)
        backoff = policy.initial_wait * 2 ** (state.attempt_number - 1)
        return min(backoff, policy.max_wait) + random.uniform(0, policy.jitter)

    def _with_retries(self, url: str, attempt: Callable[[], object]):
        policy = self.config.retry

        def should_retry(exc: BaseException) -> bool:
            return isinstance(exc, TransientError) and not isinstance(exc, CircuitOpen)

        def before_sleep(state: RetryCallState) -> None:
            self._count(retries=1)
            log.warning("retrying %s after attempt %d: %s", url, state.attempt_number, state.outcome.exception())

        retrying = Retrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(should_retry),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            server = server_of(url)
        except ValueError:
            server = url  # malformed: the attempt itself says so
        slots = _host_slots(server, self.config.max_connections_per_host)

        def bounded():
            with slots:  # held for the whole attempt, body included; never during a backoff sleep
                return attempt()

        return retrying(bounded)


def _outcome(exc: BaseException | None) -> None:
    """A request's outcome, replayed through the breaker: raise what the request raised."""
    if exc is not None:
        raise exc


def _never_connected(exc: BaseException) -> bool:
    """True when the connection was never made (refused, no route, DNS, connect timeout)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (NewConnectionError, ConnectTimeoutError, ConnectionRefusedError)):
            return True
        reason = getattr(e, "reason", None)
        for nxt in (reason, e.__cause__, e.__context__, *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return False


def _root_cause(exc: BaseException) -> str:
    """A short reason for a requests/urllib3 connection error: "connection refused", ..."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        reason = getattr(e, "reason", None)
        e = reason if isinstance(reason, BaseException) else (
            e.args[0] if e.args and isinstance(e.args[0], BaseException) else e.__cause__ or e.__context__)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: look for the specific first
    if any(isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED for e in chain):
        return "connection refused"
    for e in chain:
        if type(e).__name__ == "NameResolutionError" or isinstance(e, socket.gaierror):
            host = getattr(getattr(e, "conn", None), "host", None)
            return f"DNS lookup failed{f' for {host}' if host else ''}"
    if any(isinstance(e, ConnectionResetError) for e in chain):
        return "connection reset by the server"
    if any(isinstance(e, (socket.timeout, ConnectTimeoutError)) for e in chain):
        return "connect timed out"
    text = str(chain[-1])
    # urllib3 prefixes its connection object's repr; keep what follows it
    return re.sub(r"^<[^>]*>:\s*", "", text)[:300]


def _is_local_write_error(exc: OSError) -> bool:
    """An OSError from our own disk (ENOSPC, EROFS, EACCES...), not from the network."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG, errno.EIO)


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _content_range(url: str, resp: requests.Response) -> tuple[int, int, int | None]:
    m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if not m:
        resp.close()
        raise FetchError(url, f"206 answer with a bad Content-Range {resp.headers.get('Content-Range')!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    first, last = int(m.group(1)), int(m.group(2))
    if last < first:
        resp.close()
        raise FetchError(url, f"206 answer with a reversed Content-Range {resp.headers.get('Content-Range')!r}")
    return first, last, total
