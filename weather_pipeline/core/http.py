"""HTTP access to NOAA sources: one pooled session, timeouts, retries, rate limits, checks.

Libraries, and why:
- requests: connection pooling (HTTP keep-alive) through one Session per client.
- tenacity: the retry loop (exponential backoff with jitter, stop after N attempts). Every
  attempt goes through our own code, so each one passes the rate limiter and is counted;
  urllib3's built-in Retry would retry inside the adapter, invisible to both.
- pyrate-limiter (SQLite bucket + file lock): a sliding-window limit per host shared by every
  process on the machine, which is what NOMADS counts (it blocks an IP, not a process).
"""

from __future__ import annotations

import logging
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from weather_pipeline.core.idx import ByteRange

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


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


class TransientError(FetchError):
    """Worth retrying: 429/5xx, a dropped connection, a timeout, a short or corrupt body."""

    def __init__(self, url: str, reason: str, retry_after: float | None = None):
        super().__init__(url, reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_wait: float = 1.0  # seconds before the 2nd attempt, doubled each time after
    max_wait: float = 60.0
    jitter: float = 1.0  # up to this many seconds added at random, so clients do not sync up
    max_retry_after: float = 300.0  # a longer Retry-After is treated as a failure


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

    @classmethod
    def get(cls, db_path: Path, host: str, limit: int, window_s: float) -> "_HostLimiter":
        key = (str(db_path), host, limit, window_s)
        with cls._cache_lock:
            if key not in cls._cache:
                cls._cache[key] = cls(db_path, host, limit, window_s)
            return cls._cache[key]

    def acquire(self) -> float:
        t0 = time.monotonic()
        if not self._limiter.try_acquire(self.host):
            raise FetchError(self.host, "rate limiter: no request slot within 10 minutes")
        return time.monotonic() - t0


class HttpClient:
    """One pooled session with the retry, rate-limit and Range rules of this project."""

    def __init__(self, config: HttpConfig | None = None, *, sleep: Callable[[float], None] = time.sleep):
        self.config = config or HttpConfig()
        self.stats = FetchStats()
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

    # -- public API ----------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        """HEAD the URL: True if present, False on 404/403; retries transient failures."""
        try:
            self._with_retries(url, lambda: self._head_once(url))
            return True
        except NotFound:
            return False

    def get_text(self, url: str) -> str:
        return self.get_bytes(url).decode("utf-8", errors="replace")

    def get_bytes(
        self,
        url: str,
        byte_range: ByteRange | None = None,
        *,
        allow_full: bool = False,
        validate: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """GET a URL (or one byte range of it) whole and checked, with retries.

        `validate` runs on the body; a ValueError from it counts as a corrupt transfer and is
        retried like a dropped connection (the bytes on the server are presumed good).
        """
        return self._with_retries(url, lambda: self._get_once(url, byte_range, allow_full, validate))

    def download(self, url: str, dest: Path, *, progress: Callable[[int, int | None], None] | None = None) -> int:
        """Stream a whole file to `dest` (not atomically: callers write to a temp name)."""
        return self._with_retries(url, lambda: self._download_once(url, dest, progress))

    # -- one attempt each ----------------------------------------------------------------
    def _before_request(self, url: str) -> None:
        host = urlsplit(url).hostname or ""
        limit = self.config.rate_limits.get(host)
        waited = 0.0
        if limit:
            waited = _HostLimiter.get(self.config.rate_limit_db, host, int(limit), self.config.rate_window_s).acquire()
        self.stats.add(requests=1, waited=waited)

    def _timeouts(self) -> tuple[float, float]:
        return (self.config.connect_timeout, self.config.read_timeout)

    def _send(self, method: str, url: str, headers: dict[str, str] | None = None) -> requests.Response:
        self._before_request(url)
        try:
            # Redirects are followed by hand so that each hop is rate limited and counted.
            resp = self._session.request(
                method, url, headers=headers, stream=True, timeout=self._timeouts(), allow_redirects=False
            )
            hops = 0
            while resp.is_redirect and hops < 5:
                location = resp.headers.get("Location")
                resp.close()
                if not location:
                    raise TransientError(url, f"HTTP {resp.status_code} without a Location header")
                url = requests.compat.urljoin(resp.url, location)
                self._before_request(url)
                resp = self._session.request(
                    method, url, headers=headers, stream=True, timeout=self._timeouts(), allow_redirects=False
                )
                hops += 1
        except requests.Timeout as exc:
            raise TransientError(url, f"timed out ({exc.__class__.__name__})") from None
        except requests.ConnectionError as exc:
            raise TransientError(url, f"connection failed: {exc}") from None
        self._raise_for_status(url, resp)
        return resp

    def _raise_for_status(self, url: str, resp: requests.Response) -> None:
        code = resp.status_code
        if code < 400:
            return
        resp.close()
        if code in (403, 404):
            raise NotFound(url, f"HTTP {code}: the source does not have this file")
        if code in RETRY_STATUSES:
            raise TransientError(url, f"HTTP {code}", _parse_retry_after(resp.headers.get("Retry-After")))
        raise FetchError(url, f"HTTP {code}")

    def _head_once(self, url: str) -> None:
        self._send("HEAD", url).close()

    def _read_body(self, url: str, resp: requests.Response, expected: int | None) -> bytes:
        try:
            body = resp.raw.read(decode_content=False) if expected is None else _read_exactly(resp, expected)
        except Exception as exc:  # urllib3's ProtocolError, socket errors, timeouts mid-body
            raise TransientError(url, f"body interrupted: {exc.__class__.__name__}: {exc}") from None
        finally:
            resp.close()
        self.stats.add(nbytes=len(body))
        if expected is not None and len(body) != expected:
            raise TransientError(url, f"short body: got {len(body)} of {expected} bytes")
        return body

    def _get_once(
        self,
        url: str,
        byte_range: ByteRange | None,
        allow_full: bool,
        validate: Callable[[bytes], None] | None,
    ) -> bytes:
        headers = {"Range": byte_range.header} if byte_range else None
        # Ask for identity encoding: byte offsets from the .idx refer to the raw file.
        headers = {**(headers or {}), "Accept-Encoding": "identity"}
        resp = self._send("GET", url, headers)
        declared = _content_length(resp)
        if byte_range is None:
            body = self._read_body(url, resp, declared)
        elif resp.status_code == 206:
            first, last, total = _content_range(url, resp)
            want_last = byte_range.end if byte_range.end is not None else total - 1
            if first != byte_range.start or (total is not None and last != min(want_last, total - 1)):
                resp.close()
                raise FetchError(url, f"asked for {byte_range.header}, server sent bytes {first}-{last}/{total}")
            body = self._read_body(url, resp, last - first + 1)
        elif resp.status_code == 200:
            if not allow_full:
                # Close without reading: a ignored Range must not silently cost the whole file.
                resp.close()
                raise RangeIgnored(url, f"server ignored Range {byte_range.header} and sent the whole file "
                                        f"({declared if declared is not None else 'unknown'} bytes); "
                                        "full downloads are not allowed for this request")
            whole = self._read_body(url, resp, declared)
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

    def _download_once(self, url: str, dest: Path, progress: Callable[[int, int | None], None] | None) -> int:
        resp = self._send("GET", url, {"Accept-Encoding": "identity"})
        declared = _content_length(resp)
        done = 0
        try:
            with open(dest, "wb") as fh:
                for chunk in resp.raw.stream(1 << 20, decode_content=False):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, declared)
        except Exception as exc:
            raise TransientError(url, f"download interrupted after {done} bytes: {exc}") from None
        finally:
            resp.close()
            self.stats.add(nbytes=done)
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
            if not isinstance(exc, TransientError):
                return False
            return exc.retry_after is None or exc.retry_after <= policy.max_retry_after

        def before_sleep(state: RetryCallState) -> None:
            self.stats.add(retries=1)
            log.warning("retrying %s after attempt %d: %s", url, state.attempt_number, state.outcome.exception())

        retrying = Retrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(should_retry),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(attempt)


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
    return int(m.group(1)), int(m.group(2)), total


def _read_exactly(resp: requests.Response, n: int) -> bytes:
    buf = bytearray()
    for chunk in resp.raw.stream(1 << 20, decode_content=False):
        buf += chunk
        if len(buf) > n:
            break
    return bytes(buf)

