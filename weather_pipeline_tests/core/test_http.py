"""The HTTP client's retry, Range and rate-limit rules, against the loopback mirror server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from weather_pipeline.core.http import (
    FetchError,
    HttpClient,
    HttpConfig,
    NotFound,
    RangeIgnored,
    RetryPolicy,
    TransientError,
)
from weather_pipeline.core.idx import ByteRange
from weather_pipeline.mirror.server import MirrorServer

SIZE = 300_000


@pytest.fixture()
def served(tmp_path):
    data = os.urandom(SIZE)
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "file.bin").write_bytes(data)
    with MirrorServer(tmp_path) as server:
        yield server, f"{server.url}/bucket/file.bin", data


class SleepRecorder:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_client(sleep=None, **retry) -> HttpClient:
    policy = RetryPolicy(**{"max_attempts": 4, "initial_wait": 1.0, "jitter": 0.5, **retry})
    return HttpClient(HttpConfig(connect_timeout=2, read_timeout=2, retry=policy), sleep=sleep or SleepRecorder())


def test_range_request_returns_exact_bytes_in_one_request(served):
    server, url, data = served
    client = make_client()
    assert client.get_bytes(url, ByteRange(1000, 1999)) == data[1000:2000]
    assert client.get_bytes(url, ByteRange(SIZE - 10, None)) == data[-10:]
    assert client.stats.requests == 2 and client.stats.bytes == 1010
    assert [r.range for r in server.request_log] == ["bytes=1000-1999", f"bytes={SIZE - 10}-"]


@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
def test_transient_status_is_retried_with_exponential_backoff(served, code):
    server, url, data = served
    server.faults.add("bucket/*", "status", code=code, times=2)
    sleep = SleepRecorder()
    client = make_client(sleep)
    assert client.get_bytes(url, ByteRange(0, 99)) == data[:100]
    assert client.stats.requests == 3 and client.stats.retries == 2
    assert 1.0 <= sleep.calls[0] <= 1.5 and 2.0 <= sleep.calls[1] <= 2.5


def test_retry_after_is_honoured(served):
    server, url, data = served
    server.faults.add("bucket/*", "status", code=503, retry_after=7)
    sleep = SleepRecorder()
    assert make_client(sleep).get_bytes(url, ByteRange(0, 9)) == data[:10]
    assert len(sleep.calls) == 1 and 7.0 <= sleep.calls[0] <= 7.5


def test_gives_up_after_max_attempts(served):
    server, url, _ = served
    server.faults.add("bucket/*", "status", code=500, times=None)
    client = make_client(max_attempts=3)
    with pytest.raises(TransientError, match="HTTP 500"):
        client.get_bytes(url, ByteRange(0, 9))
    assert client.stats.requests == 3


def test_missing_file_is_not_found_without_retries(served):
    server, url, _ = served
    client = make_client()
    with pytest.raises(NotFound):
        client.get_bytes(url + ".idx")
    assert client.stats.requests == 1
    assert client.exists(url) and not client.exists(url + ".nope")


def test_other_client_errors_fail_at_once(served):
    server, url, _ = served
    server.faults.add("bucket/*", "status", code=400)
    client = make_client()
    with pytest.raises(FetchError, match="HTTP 400"):
        client.get_bytes(url, ByteRange(0, 9))
    assert client.stats.requests == 1


def test_ignored_range_is_an_error_and_the_body_is_not_read(served):
    server, url, _ = served
    server.faults.add("bucket/*", "ignore_range")
    client = make_client()
    with pytest.raises(RangeIgnored, match="whole file"):
        client.get_bytes(url, ByteRange(0, 99))
    assert client.stats.bytes == 0 and client.stats.requests == 1


def test_ignored_range_is_sliced_when_full_downloads_are_allowed(served):
    server, url, data = served
    server.faults.add("bucket/*", "ignore_range")
    client = make_client()
    assert client.get_bytes(url, ByteRange(500, 599), allow_full=True) == data[500:600]
    assert client.stats.bytes == SIZE


def test_truncated_body_is_retried(served):
    server, url, data = served
    server.faults.add("bucket/*", "truncate")
    client = make_client()
    assert client.get_bytes(url, ByteRange(0, 99_999)) == data[:100_000]
    assert client.stats.retries == 1 and client.stats.requests == 2


def test_truncated_whole_download_is_retried(served, tmp_path):
    server, url, data = served
    server.faults.add("bucket/*", "truncate", keep_bytes=1000)
    client = make_client()
    dest = tmp_path / "out.bin"
    assert client.download(url, dest) == SIZE
    assert dest.read_bytes() == data and client.stats.retries == 1


def test_corrupt_body_fails_the_content_check_and_is_retried(served):
    server, url, data = served
    server.faults.add("bucket/*", "corrupt", count=16)
    want = hashlib.md5(data[:50_000]).hexdigest()

    def check(body: bytes) -> None:
        if hashlib.md5(body).hexdigest() != want:
            raise ValueError("md5 mismatch")

    client = make_client()
    assert client.get_bytes(url, ByteRange(0, 49_999), validate=check) == data[:50_000]
    assert client.stats.retries == 1


def test_read_timeout_is_retried(served):
    server, url, data = served
    server.faults.add("bucket/*", "delay", seconds=1.5)
    client = HttpClient(HttpConfig(read_timeout=0.5, retry=RetryPolicy(max_attempts=3, jitter=0)), sleep=SleepRecorder())
    assert client.get_bytes(url, ByteRange(0, 9)) == data[:10]
    assert client.stats.retries == 1


def test_connection_refused_is_retried_then_fails():
    client = make_client(max_attempts=2)
    with pytest.raises(TransientError, match="connection failed"):
        client.get_bytes("http://127.0.0.1:9/nothing", ByteRange(0, 9))
    assert client.stats.requests == 2


def test_redirect_is_followed_and_each_hop_counted(served):
    server, url, data = served
    server.faults.add("bucket/*", "redirect")
    client = make_client()
    assert client.get_bytes(url, ByteRange(0, 9)) == data[:10]
    assert client.stats.requests == 2
    assert [r.status for r in server.request_log] == [302, 206]


def test_rate_limit_holds_across_processes(served, tmp_path):
    """Two processes share one bucket: no 2-second window ever sees more than 5 requests."""
    server, url, _ = served
    db = tmp_path / "rl.sqlite"
    script = textwrap.dedent(
        f"""
        import weather_pipeline
        from weather_pipeline.core.http import HttpClient, HttpConfig
        from weather_pipeline.core.idx import ByteRange
        cfg = HttpConfig(rate_limits={{"127.0.0.1": 5}}, rate_window_s=2.0, rate_limit_db=__import__("pathlib").Path({str(db)!r}))
        c = HttpClient(cfg)
        for i in range(6):
            c.get_bytes({url!r}, ByteRange(0, 9))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    times = sorted(r.started for r in server.request_log)
    assert len(times) == 12
    busiest = max(sum(1 for t in times if t0 <= t < t0 + 1.9) for t0 in times)
    assert busiest <= 5, f"{busiest} requests within one window"
    assert times[-1] - times[0] >= 3.5  # 12 requests at 5 per 2 s need at least two full windows
