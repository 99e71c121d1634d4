"""A loopback HTTP server that serves a local mirror of NOAA's S3 buckets.

The mirror is a directory tree laid out like the bucket (for example
``hrrr.20260512/conus/hrrr.t00z.wrfsfcf00.grib2`` plus its ``.idx``).  The
server answers the way S3 does for the requests our download client makes:

* ``GET``/``HEAD`` of an object, with single byte ranges (``bytes=A-B``,
  ``bytes=A-``, ``bytes=-N``), ``206``/``416`` and S3-style XML errors;
* ``GET /?list-type=2&prefix=P&delimiter=/`` prefix listings of the whole root
  and, path-style, ``GET /<bucket>/?list-type=2&prefix=P`` listings of one
  top-level directory (keys relative to it, ``<Name>`` the bucket), which is
  how the catalog's mirror URLs (``{mirror}/noaa-hrrr-bdp-pds``) are listed;
  both page with ``max-keys`` and ``continuation-token`` when asked to (without
  ``max-keys`` every match comes in one response, unlike S3's 1000 cap).

For tests of a client's retry and verification logic it can inject faults
(error statuses, ignored ranges, truncated or corrupted bodies, delays and
redirects) selected by glob rules, and it records every request it answers.
Rules and the log can be driven in-process (``server.faults``,
``server.request_log``) or over HTTP from another process under
``/_mirror/`` (see :class:`_Handler` for the endpoints).

Only the standard library is used so the server can run anywhere the
pipeline's tests run::

    with MirrorServer(Path("/data/mirror")) as server:
        server.faults.add("*.grib2", "status", code=503, retry_after=1)
        fetch(server.url + "/hrrr.20260512/conus/hrrr.t00z.wrfsfcf00.grib2")

or from a shell: ``python -m weather_pipeline.mirror.server /data/mirror --port 8080``.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = [
    "FaultMode",
    "FaultRule",
    "FaultRules",
    "MirrorServer",
    "RangeNotSatisfiable",
    "RequestRecord",
    "parse_range",
]

FaultMode = Literal["status", "ignore_range", "truncate", "corrupt", "delay", "redirect", "trickle", "reset"]
FAULT_MODES: tuple[str, ...] = get_args(FaultMode)

# Big enough to keep syscall overhead low, small enough that a 500 MB GRIB2
# file never sits in memory.
CHUNK_SIZE = 256 * 1024
# Upper bound for JSON bodies posted to the control endpoints.
MAX_CONTROL_BODY = 1024 * 1024
CONTROL_PREFIX = "_mirror/"
S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


# --------------------------------------------------------------------------
# Range parsing
# --------------------------------------------------------------------------


class RangeNotSatisfiable(ValueError):
    """The Range header is valid but selects no byte of the object (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a ``Range`` header for an object of ``size`` bytes, as S3 does.

    Returns the inclusive ``(start, end)`` byte positions, or ``None`` when the
    whole object should be sent: no header, a unit other than ``bytes``, a
    malformed spec or several ranges (S3 ignores those and answers ``200``).
    Raises :class:`RangeNotSatisfiable` when the range starts at or past the
    end of the object, or is an empty suffix (``bytes=-0``).
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None  # multi-range: answered with the whole body, like S3
    first, dash, last = (part.strip() for part in spec.partition("-"))
    # Only ASCII digits are valid; str.isdigit() would accept e.g. "²".
    if not dash or not _is_ascii_digits(first or "0") or not _is_ascii_digits(last or "0"):
        return None
    if not first:
        if not last:
            return None  # "bytes=-" is malformed
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range {header!r} of a {size}-byte object")
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid, so RFC 9110 says ignore it
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts past a {size}-byte object")
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


def _is_ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


# --------------------------------------------------------------------------
# Fault rules
# --------------------------------------------------------------------------


@dataclass
class FaultRule:
    """One fault to inject into requests whose key matches ``path_glob``.

    ``path_glob`` is matched with :func:`fnmatch.fnmatchcase` against the
    decoded URL path without its leading slash (the S3 key; ``""`` for the
    root listing, ``"<bucket>/"`` for a path-style bucket listing).  Note that ``*`` also matches ``/``.  ``times`` is how many
    requests the rule affects before it is used up (``None``: forever).

    Mode parameters (the others are ignored):

    * ``status``: answer ``code`` with an S3-style XML error body and, if
      ``retry_after`` is set, a ``Retry-After`` header.
    * ``ignore_range``: answer a ranged request for a file with ``200`` and the
      whole file.  Only requests with a Range header for an existing file use
      the rule up.
    * ``truncate``: send the full headers but only ``keep_bytes`` bytes of body
      (default half, always at least one byte short), then close the
      connection.  Only GETs that would send a non-empty body use it up.
    * ``corrupt``: flip every bit of ``count`` bytes in the middle of the body
      (deterministic, same length).  Only GETs with a non-empty body use it up.
    * ``delay``: sleep ``seconds`` before answering normally.
    * ``redirect``: answer ``302`` to the same URL with ``redirected=1`` added
      to the query (on ``location``, a base URL such as ``http://other:8080``,
      when set; else on this server).  Requests that already carry
      ``redirected=1`` never match a redirect rule, so even ``times=None``
      cannot loop.
    * ``trickle``: send the headers, then ``count`` body bytes every
      ``seconds`` (a stalled transfer that never trips a read timeout).
      Only GETs with a non-empty body use it up.
    * ``reset``: close the connection with a TCP reset before answering.
    """

    path_glob: str
    mode: FaultMode
    times: int | None = 1
    code: int = 503
    retry_after: str | None = None
    keep_bytes: int | None = None
    count: int = 16
    seconds: float = 1.0
    location: str | None = None
    # How many requests this rule has affected so far.
    used: int = 0

    def __post_init__(self) -> None:
        # Validate eagerly so a bad rule posted over HTTP fails the POST, not
        # some later request in the middle of a test.
        if not isinstance(self.path_glob, str):
            raise ValueError("path_glob must be a string")
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; expected one of {FAULT_MODES}")
        if self.times is not None and (not _is_int(self.times) or self.times < 1):
            raise ValueError("times must be a positive integer or None (forever)")
        if not _is_int(self.code) or not 200 <= self.code <= 599:
            raise ValueError("code must be an HTTP status between 200 and 599")
        if self.retry_after is not None:
            self.retry_after = str(self.retry_after)
        if self.keep_bytes is not None and (not _is_int(self.keep_bytes) or self.keep_bytes < 0):
            raise ValueError("keep_bytes must be a non-negative integer or None (half)")
        if not _is_int(self.count) or self.count < 1:
            raise ValueError("count must be a positive integer")
        seconds_is_number = isinstance(self.seconds, (int, float)) and not isinstance(
            self.seconds, bool
        )
        if not seconds_is_number or self.seconds < 0:
            raise ValueError("seconds must be a non-negative number")
        if self.location is not None and urlsplit(str(self.location)).scheme not in ("http", "https"):
            raise ValueError("location must be an http(s) base URL")

    @property
    def used_up(self) -> bool:
        return self.times is not None and self.used >= self.times

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultRule:
        """Build a rule from JSON; unknown keys are an error (typos would otherwise be silent)."""
        if not isinstance(data, dict):
            raise ValueError("a fault rule must be a JSON object")
        allowed = {name for name in cls.__dataclass_fields__ if name != "used"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown fault rule keys: {sorted(unknown)}")
        if "mode" not in data:
            raise ValueError("a fault rule needs a 'mode'")
        return cls(**{"path_glob": "*", **data})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class _RequestFacts:
    """What a rule needs to know to decide whether it applies to a request."""

    key: str
    ranged_file: bool  # a Range header was honoured (206) or refused (416) for a file
    sends_body: bool  # a GET that would send a non-empty 200/206 body
    redirected: bool  # the query already carries redirected=1


class FaultRules:
    """A thread-safe, ordered list of :class:`FaultRule` held by the server.

    For each request the first rule that matches and is not used up applies
    (and one of its ``times`` is consumed atomically).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []

    def add(
        self,
        path_glob: str,
        mode: FaultMode,
        *,
        times: int | None = 1,
        code: int = 503,
        retry_after: str | int | float | None = None,
        keep_bytes: int | None = None,
        count: int = 16,
        seconds: float = 1.0,
        location: str | None = None,
    ) -> FaultRule:
        """Append a rule and return it (its ``used`` counter can be inspected)."""
        rule = FaultRule(
            path_glob=path_glob,
            mode=mode,
            times=times,
            code=code,
            retry_after=None if retry_after is None else str(retry_after),
            keep_bytes=keep_bytes,
            count=count,
            seconds=seconds,
            location=location,
        )
        return self.add_rule(rule)

    def add_rule(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def extend(self, rules: Iterable[FaultRule]) -> None:
        with self._lock:
            self._rules.extend(rules)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def snapshot(self) -> list[FaultRule]:
        """Copies of the current rules, so callers cannot race the handlers."""
        with self._lock:
            return [FaultRule(**asdict(rule)) for rule in self._rules]

    def __len__(self) -> int:
        with self._lock:
            return len(self._rules)

    def take(self, facts: _RequestFacts) -> FaultRule | None:
        """Find the rule for a request and consume one use of it."""
        with self._lock:
            for rule in self._rules:
                if not rule.used_up and _applies(rule, facts):
                    rule.used += 1
                    return rule
        return None


def _applies(rule: FaultRule, facts: _RequestFacts) -> bool:
    if not fnmatchcase(facts.key, rule.path_glob):
        return False
    # Body modes only consume a use when they can actually change something,
    # so e.g. a client's HEAD before its GET does not waste a truncate rule.
    if rule.mode == "ignore_range":
        return facts.ranged_file
    if rule.mode in ("truncate", "corrupt", "trickle"):
        return facts.sends_body
    if rule.mode == "redirect":
        return not facts.redirected
    return True


# --------------------------------------------------------------------------
# Request log
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One answered request (control requests under ``/_mirror/`` are not logged)."""

    method: str
    path: str  # URL path as received, without the query
    query: str
    range: str | None  # the Range header as received
    status: int
    content_length: int | None  # the Content-Length header sent
    body_bytes: int  # body bytes actually written
    fault: str | None  # mode of the fault rule applied, if any
    started: float  # time.time() when the request was received

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------


@dataclass
class _Response:
    """A response decided on before fault injection may alter it."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: BinaryIO | None = None  # when set, stream `length` bytes from `offset`
    offset: int = 0
    length: int | None = None

    @property
    def body_length(self) -> int:
        return len(self.body) if self.file is None else (self.length or 0)

    def chunks(self) -> Iterator[bytes]:
        if self.file is None:
            for start in range(0, len(self.body), CHUNK_SIZE):
                yield self.body[start : start + CHUNK_SIZE]
            return
        self.file.seek(self.offset)
        remaining = self.length or 0
        while remaining > 0:
            chunk = self.file.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                return  # the file shrank under us; the caller closes the connection
            remaining -= len(chunk)
            yield chunk


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], mirror: MirrorServer) -> None:
        # Pick the family from the host so "::1" works as well as "127.0.0.1".
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.mirror = mirror
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response is routine in fault tests; stay quiet.
        if self.mirror.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Answers object, listing and control requests.

    Control endpoints (never logged, never faulted)::

        POST   /_mirror/faults   JSON rule object or list of them, appended
        GET    /_mirror/faults   current rules as JSON
        DELETE /_mirror/faults   remove all rules
        GET    /_mirror/log      request log as a JSON list
        DELETE /_mirror/log      clear the request log
    """

    protocol_version = "HTTP/1.1"  # keep-alive, so client connection reuse is real
    server_version = "weather-pipeline-mirror"
    sys_version = ""
    # Idle keep-alive connections are dropped after this long, as S3 does, so
    # a long-running CLI server does not accumulate threads.
    timeout = 120

    server: _HTTPServer

    def version_string(self) -> str:
        return self.server_version  # no "Python/3.x" suffix (or trailing space)

    # -- connection bookkeeping ------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.mirror._track_connection(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.mirror._track_connection(self.connection, open_=False)

    # -- quiet logging ---------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # we log one richer line per request ourselves

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.mirror.verbose:
            sys.stderr.write(f"mirror {self.address_string()} {format % args}\n")

    # -- method entry points ---------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        key = unquote(url.path).lstrip("/")
        # Decide on the decoded path so "/%5Fmirror/..." cannot reach files either.
        if key.startswith(CONTROL_PREFIX) or key == CONTROL_PREFIX.rstrip("/"):
            self._control(key)
            return

        mirror = self.server.mirror
        mirror._request_started()
        self._sent_status = 0
        self._sent_length: int | None = None
        self._body_bytes = 0
        fault: FaultRule | None = None
        started = time.time()
        try:
            fault = self._serve(key, url.query)
        finally:
            record = RequestRecord(
                method=self.command,
                path=url.path,
                query=url.query,
                range=self.headers.get("Range"),
                status=self._sent_status,
                content_length=self._sent_length,
                body_bytes=self._body_bytes,
                fault=fault.mode if fault else None,
                started=started,
            )
            mirror._request_finished(record)
            self.log_message(
                '"%s" %s %s/%s%s',
                self.requestline,
                record.status,
                record.body_bytes,
                record.content_length,
                f" fault={record.fault}" if record.fault else "",
            )

    # -- objects and listings --------------------------------------------

    def _serve(self, key: str, query: str) -> FaultRule | None:
        """Answer a data request; returns the fault rule applied, if any."""
        if self.command not in ("GET", "HEAD"):
            # We never read a request body here, so drop the connection rather
            # than parse the body as the next request.
            self.close_connection = True
            response = _error_response(
                405, "MethodNotAllowed", "The specified method is not allowed.", key
            )
            response.headers.append(("Allow", "GET, HEAD"))
            self._send(response)
            return None

        params = parse_qs(query, keep_blank_values=True)
        if key == "":
            response = self._listing(params)
        elif (bucket := self._listed_bucket(key, params)) is not None:
            response = self._listing(params, bucket)
        else:
            response = self._object(key)  # a directory is no object: 404
        try:
            facts = _RequestFacts(
                key=key,
                ranged_file=response.status in (206, 416),  # only file answers use these
                sends_body=self.command == "GET"
                and response.status in (200, 206)
                and response.body_length > 0,
                redirected="1" in params.get("redirected", []),
            )
            fault = self.server.mirror.faults.take(facts)
            self._send_with_fault(response, fault, query)
            return fault
        finally:
            if response.file is not None:
                response.file.close()

    def _object(self, key: str, *, honour_range: bool = True) -> _Response:
        path = self.server.mirror._resolve_key(key)
        if path is None:
            return _error_response(404, "NoSuchKey", "The specified key does not exist.", key)
        try:
            # Stat the open descriptor so size, ETag and bytes all describe the
            # same file even if the mirror replaces it while we stream.
            handle = open(path, "rb")
        except OSError:
            return _error_response(404, "NoSuchKey", "The specified key does not exist.", key)
        try:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):  # replaced by a directory since resolving
                handle.close()
                return _error_response(404, "NoSuchKey", "The specified key does not exist.", key)
            size = st.st_size
            etag = _etag(st)
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            headers = [
                ("Accept-Ranges", "bytes"),
                ("Last-Modified", last_modified),
                ("ETag", etag),
            ]
            range_header = self.headers.get("Range") if honour_range else None
            if_range = self.headers.get("If-Range")
            if range_header and if_range and if_range.strip() not in (etag, last_modified):
                range_header = None  # the client's copy is stale: send it everything
            try:
                byte_range = parse_range(range_header, size)
            except RangeNotSatisfiable:
                handle.close()
                response = _error_response(
                    416, "InvalidRange", "The requested range is not satisfiable", key
                )
                response.headers += headers + [("Content-Range", f"bytes */{size}")]
                return response
            headers.append(("Content-Type", "application/octet-stream"))
            if byte_range is None:
                return _Response(200, headers, file=handle, offset=0, length=size)
            start, end = byte_range
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            return _Response(206, headers, file=handle, offset=start, length=end - start + 1)
        except BaseException:
            handle.close()
            raise

    def _listed_bucket(self, key: str, params: dict[str, list[str]]) -> str | None:
        """The bucket of a path-style ListObjectsV2 request (``/<bucket>/?list-type=2``).

        Only a single existing top-level directory, with or without its
        trailing slash, and only with ``list-type=2``: any other request for a
        directory stays a 404, as S3 has no objects named like a prefix.
        """
        if params.get("list-type") != ["2"]:
            return None
        bucket = key[:-1] if key.endswith("/") else key
        if not bucket or "/" in bucket or self.server.mirror._safe_dir(bucket) is None:
            return None
        return bucket

    def _listing(self, params: dict[str, list[str]], bucket: str | None = None) -> _Response:
        """A ListObjectsV2 answer for the root (``bucket=None``) or one top-level directory."""
        prefix = params.get("prefix", [""])[0]
        delimiter = params.get("delimiter", [""])[0]
        token = params.get("continuation-token", [None])[0]
        raw_max_keys = params.get("max-keys", [None])[0]
        try:
            max_keys = None if raw_max_keys is None else int(raw_max_keys)
            if max_keys is not None and max_keys < 0:
                raise ValueError(raw_max_keys)
        except ValueError:
            return _error_response(
                400, "InvalidArgument", "max-keys must be a non-negative integer", ""
            )
        after = None
        if token is not None:
            after = _decode_token(token)
            if after is None:
                return _error_response(
                    400, "InvalidArgument", "The continuation token provided is incorrect", ""
                )

        mirror = self.server.mirror
        # The bucket directory is just the first key segment below the root.
        key_base = f"{bucket}/" if bucket else ""
        contents, common = mirror._list(key_base + prefix, delimiter)
        # S3 pages keys and common prefixes together, in key order.
        entries: list[tuple[str, os.stat_result | None]] = sorted(
            [(key[len(key_base) :], st) for key, st in contents]
            + [(p[len(key_base) :], None) for p in common],
            key=lambda item: item[0],
        )
        if after is not None:
            entries = [entry for entry in entries if entry[0] > after]
        page = entries if max_keys is None else entries[:max_keys]
        truncated = max_keys is not None and 0 < max_keys < len(entries)

        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<ListBucketResult xmlns="{S3_XMLNS}">',
            f"<Name>{escape(bucket or mirror.root.name)}</Name>",
            f"<Prefix>{escape(prefix)}</Prefix>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if token is not None:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        parts += [
            f"<KeyCount>{len(page)}</KeyCount>",
            f"<MaxKeys>{1000 if max_keys is None else max_keys}</MaxKeys>",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if truncated:
            next_token = _encode_token(page[-1][0])
            parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
        for key, st in page:
            if st is None:
                continue
            modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(st.st_mtime))
            parts.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}</LastModified>"
                f"<ETag>{escape(_etag(st))}</ETag><Size>{st.st_size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        for common_prefix, st in page:
            if st is None:
                parts.append(
                    f"<CommonPrefixes><Prefix>{escape(common_prefix)}</Prefix></CommonPrefixes>"
                )
        parts.append("</ListBucketResult>")
        body = "".join(parts).encode("utf-8")
        return _Response(200, [("Content-Type", "application/xml")], body=body)

    # -- sending ---------------------------------------------------------

    def _send_with_fault(self, response: _Response, fault: FaultRule | None, query: str) -> None:
        if fault is None:
            self._send(response)
        elif fault.mode == "delay":
            # An Event wait rather than time.sleep so stop() is not held up.
            self.server.mirror._stopping.wait(fault.seconds)
            self._send(response)
        elif fault.mode == "status":
            code = fault.code
            if code >= 400:
                err_code, message = _S3_ERRORS.get(code, ("InjectedFault", "Injected fault"))
                injected = _error_response(code, err_code, message, "")
            else:
                injected = _Response(code)
            if fault.retry_after is not None:
                injected.headers.append(("Retry-After", fault.retry_after))
            self._send(injected)
        elif fault.mode == "redirect":
            new_query = f"{query}&redirected=1" if query else "redirected=1"
            target = f"{urlsplit(self.path).path}?{new_query}"
            host = self.headers.get("Host")
            base = fault.location.rstrip("/") if fault.location else (f"http://{host}" if host else self.server.mirror.url)
            self._send(_Response(302, [("Location", base + target)]))
        elif fault.mode == "ignore_range":
            # Re-open rather than reuse: a 416 answer has no file handle.
            key = unquote(urlsplit(self.path).path).lstrip("/")
            whole = self._object(key, honour_range=False)
            try:
                self._send(whole)
            finally:
                if whole.file is not None:
                    whole.file.close()
        elif fault.mode == "truncate":
            length = response.body_length
            keep = length // 2 if fault.keep_bytes is None else fault.keep_bytes
            self._send(response, keep=min(keep, length - 1))
            self.close_connection = True  # the body is short, so the connection is unusable
        elif fault.mode == "corrupt":
            length = response.body_length
            count = min(fault.count, length)
            start = (length - count) // 2
            self._send(response, corrupt=(start, start + count))
        elif fault.mode == "trickle":
            self._send(response, trickle=(fault.count, fault.seconds))
        elif fault.mode == "reset":
            # SO_LINGER 0: close() sends RST instead of FIN, as a crashed peer or middlebox would
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self._sent_status = 0
        else:  # pragma: no cover - FaultRule validates modes
            raise AssertionError(fault.mode)

    def _send(
        self,
        response: _Response,
        *,
        keep: int | None = None,
        corrupt: tuple[int, int] | None = None,
        trickle: tuple[int, float] | None = None,
    ) -> None:
        """Send headers with the full Content-Length, then (part of) the body."""
        length = response.body_length
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._sent_status = response.status
        self._sent_length = length
        if self.command == "HEAD" or length == 0:
            return
        limit = length if keep is None else keep
        sent = 0
        try:
            for chunk in response.chunks():
                if sent >= limit:
                    break
                chunk = chunk[: limit - sent]
                if corrupt is not None:
                    chunk = _flip(chunk, sent, corrupt)
                if trickle is not None:
                    step, pause = trickle
                    for i in range(0, len(chunk), step):
                        if self.server.mirror._stopping.wait(pause):
                            raise ConnectionError("server stopping")
                        self.wfile.write(chunk[i : i + step])
                        self.wfile.flush()
                        sent += len(chunk[i : i + step])
                        self._body_bytes = sent
                    continue
                self.wfile.write(chunk)
                sent += len(chunk)
                self._body_bytes = sent
        except (ConnectionError, TimeoutError):
            pass  # the client went away; what we managed to send is logged
        if sent < length:
            self.close_connection = True  # Content-Length is now a lie

    # -- control endpoints ----------------------------------------------

    def _control(self, key: str) -> None:
        mirror = self.server.mirror
        endpoint = key[len(CONTROL_PREFIX) :].rstrip("/")
        method = self.command
        if method in ("POST", "PUT"):
            body = self._read_body()
            if body is None:
                return
        if endpoint == "faults":
            if method == "POST":
                try:
                    data = json.loads(body or b"null")
                    items = data if isinstance(data, list) else [data]
                    rules = [FaultRule.from_dict(item) for item in items]
                except (ValueError, TypeError) as exc:
                    self._send_json(400, {"error": str(exc)})
                    return
                mirror.faults.extend(rules)  # all or nothing: validated first
                self._send_json(200, {"added": len(rules), "rules": _rules_json(mirror.faults)})
            elif method == "GET":
                self._send_json(200, {"rules": _rules_json(mirror.faults)})
            elif method == "DELETE":
                mirror.faults.clear()
                self._send_json(200, {"rules": []})
            else:
                self._send_json(405, {"error": f"{method} not allowed"}, allow="GET, POST, DELETE")
        elif endpoint == "log":
            if method == "GET":
                self._send_json(200, [record.to_dict() for record in mirror.request_log])
            elif method == "DELETE":
                mirror.clear_log()
                self._send_json(200, [])
            else:
                self._send_json(405, {"error": f"{method} not allowed"}, allow="GET, DELETE")
        else:
            self._send_json(404, {"error": f"no control endpoint {key!r}"})

    def _read_body(self) -> bytes | None:
        """Read a request body by Content-Length; answers the error itself."""
        length_header = self.headers.get("Content-Length")
        if length_header is None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # we cannot find the end of the body
            self._send_json(411, {"error": "Content-Length required"})
            return None
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_CONTROL_BODY:
            self.close_connection = True
            self._send_json(413, {"error": "bad or too large Content-Length"})
            return None
        return self.rfile.read(length)

    def _send_json(self, status: int, payload: Any, allow: str | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


_S3_ERRORS: dict[int, tuple[str, str]] = {
    400: ("InvalidRequest", "Invalid request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    429: ("TooManyRequests", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad gateway"),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway timeout"),
}


def _error_response(status: int, code: str, message: str, key: str) -> _Response:
    key_xml = f"<Key>{escape(key)}</Key>" if key else ""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>{key_xml}</Error>"
    ).encode("utf-8")
    return _Response(status, [("Content-Type", "application/xml")], body=body)


def _encode_token(last_key: str) -> str:
    """An opaque-looking continuation token: the last key of the page, base64url."""
    return base64.urlsafe_b64encode(last_key.encode("utf-8")).decode("ascii")


def _decode_token(token: str) -> str | None:
    """The key a continuation token resumes after, or None if it is not one of ours."""
    try:
        # validate=True: reject rather than skip characters outside the alphabet.
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        return raw.decode("utf-8")
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        return None


def _etag(st: os.stat_result) -> str:
    # Hashing 500 MB per request would be absurd; size+mtime changes whenever
    # the mirror rewrites a file, which is all a client's If-Range needs.
    digest = hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()
    return f'"{digest}"'


def _flip(chunk: bytes, chunk_start: int, window: tuple[int, int]) -> bytes:
    """Invert the bits of the part of ``chunk`` inside the body ``window``."""
    lo = max(window[0], chunk_start) - chunk_start
    hi = min(window[1], chunk_start + len(chunk)) - chunk_start
    if lo >= hi:
        return chunk
    flipped = bytearray(chunk)
    for index in range(lo, hi):
        flipped[index] ^= 0xFF  # always differs from the original byte
    return bytes(flipped)


def _rules_json(rules: FaultRules) -> list[dict[str, Any]]:
    return [rule.to_dict() for rule in rules.snapshot()]


# --------------------------------------------------------------------------
# Public server
# --------------------------------------------------------------------------


class MirrorServer:
    """Serve ``root`` over HTTP like an S3 bucket, with fault injection.

    The socket is bound in the constructor (``port=0`` picks a free port), so
    :attr:`url` is known before :meth:`start`.  Use as a context manager in
    tests, or :meth:`serve_forever` from a command line.
    """

    #: How long :attr:`request_log` waits for in-flight requests to be logged.
    LOG_SETTLE_SECONDS = 2.0

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"mirror root {self.root} is not a directory")
        self.verbose = verbose
        self.faults = FaultRules()
        self._log: list[RequestRecord] = []
        # One condition guards the log and the in-flight count, so readers can
        # wait until a response the client already has is also in the log.
        self._log_cond = threading.Condition()
        self._in_flight = 0
        self._peak_in_flight = 0
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._httpd = _HTTPServer((host, port), self)

    # -- addresses ---------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:43121``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- request log -------------------------------------------------------

    @property
    def request_log(self) -> list[RequestRecord]:
        """A snapshot of the log in order of arrival (oldest first).

        A client can finish reading a response a moment before the handler
        thread records it, so this waits (briefly) for in-flight requests; and
        records are appended when answered, so they are sorted by arrival.
        """
        with self._log_cond:
            self._log_cond.wait_for(lambda: self._in_flight == 0, timeout=self.LOG_SETTLE_SECONDS)
            return sorted(self._log, key=lambda r: r.started)

    @property
    def answered_so_far(self) -> list[RequestRecord]:
        """The log as it is now, without waiting for requests still being answered."""
        with self._log_cond:
            return sorted(self._log, key=lambda r: r.started)

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered (a stalled transfer counts until it ends)."""
        with self._log_cond:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most requests answered at once since the start (or `clear_log`)."""
        with self._log_cond:
            return self._peak_in_flight

    def clear_log(self) -> None:
        with self._log_cond:
            self._log.clear()
            self._peak_in_flight = self._in_flight

    def _request_started(self) -> None:
        with self._log_cond:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)

    def _request_finished(self, record: RequestRecord) -> None:
        with self._log_cond:
            self._log.append(record)
            self._in_flight -= 1
            self._log_cond.notify_all()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> MirrorServer:
        """Serve in a daemon thread and return ``self``."""
        if self._closed or self._thread is not None:
            raise RuntimeError("a MirrorServer can only be started once")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # quick shutdown in tests
            name=f"mirror-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and close the socket (idempotent)."""
        if self._closed:
            return
        self._stopping.set()  # wake handlers sleeping in a delay fault
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._close()

    def serve_forever(self) -> None:
        """Serve in the calling thread until KeyboardInterrupt or SIGTERM."""
        if self._closed or self._thread is not None:
            raise RuntimeError("a MirrorServer can only be started once")
        previous = None
        if threading.current_thread() is threading.main_thread():
            # Turn SIGTERM into KeyboardInterrupt so both exit the same way.
            previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self._stopping.set()
            self._close()

    def _close(self) -> None:
        self._closed = True
        # Idle keep-alive connections would otherwise keep handler threads
        # blocked in readline after the server is gone.
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()

    def _track_connection(self, conn: socket.socket, *, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- filesystem --------------------------------------------------------

    def _resolve_key(self, key: str) -> Path | None:
        """Map an S3 key to a regular file inside the root, or None.

        Rejects ``.``/``..``/empty segments outright and re-checks the
        resolved path (symlinks included) is still inside the root.
        """
        if not key or "\x00" in key:
            return None
        if any(part in ("", ".", "..") for part in key.split("/")):
            return None
        try:
            candidate = (self.root / key).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    def _safe_dir(self, dir_key: str) -> Path | None:
        """Like :meth:`_resolve_key` for a directory key ('' is the root)."""
        if dir_key == "":
            return self.root
        if "\x00" in dir_key or any(part in ("", ".", "..") for part in dir_key.split("/")):
            return None
        try:
            candidate = (self.root / dir_key).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if not candidate.is_relative_to(self.root) or not candidate.is_dir():
            return None
        return candidate

    def _list(
        self, prefix: str, delimiter: str
    ) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
        """S3 ListObjects semantics: (keys with stats, common prefixes), sorted.

        Every match is returned; the handler cuts pages (``max-keys``).
        """
        dir_key, _, name_start = prefix.rpartition("/")
        base = self._safe_dir(dir_key)
        if base is None:
            return [], []
        key_base = f"{dir_key}/" if dir_key else ""
        contents: list[tuple[str, os.stat_result]] = []
        common: set[str] = set()
        if delimiter == "/":
            # Fast path: only the one directory the prefix points into is read.
            with os.scandir(base) as entries:
                for entry in entries:
                    if not entry.name.startswith(name_start):
                        continue
                    key = key_base + entry.name
                    if entry.is_file():
                        contents.append((key, entry.stat()))
                    elif entry.is_dir() and _contains_file(entry.path):
                        # S3 has no empty "directories": a prefix exists only
                        # if some key lives under it.
                        common.add(key + "/")
        else:
            for key, st in self._walk(base, key_base):
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix) :]
                if delimiter and delimiter in rest:
                    common.add(prefix + rest[: rest.index(delimiter) + len(delimiter)])
                else:
                    contents.append((key, st))
        contents.sort(key=lambda item: item[0])
        return contents, sorted(common)

    def _walk(self, base: Path, key_base: str) -> Iterator[tuple[str, os.stat_result]]:
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(base).as_posix()
            dir_prefix = key_base if rel == "." else f"{key_base}{rel}/"
            for name in filenames:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue  # removed while listing
                if stat.S_ISREG(st.st_mode):
                    yield dir_prefix + name, st


def _contains_file(path: str) -> bool:
    for _dirpath, _dirnames, filenames in os.walk(path):
        if filenames:
            return True
    return False


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Command line: serve a mirror directory until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="mirror directory (laid out like the bucket)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--verbose", action="store_true", help="log one line per request")
    args = parser.parse_args(argv)
    server = MirrorServer(args.root, args.host, args.port, verbose=args.verbose)
    print(f"serving {server.root} at {server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
