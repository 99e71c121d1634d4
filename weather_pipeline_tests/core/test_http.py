"""The HTTP client's retry, Range and rate-limit rules, against the loopback mirror server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

import socket
import threading
import time

from weather_pipeline.core.http import (
    CircuitOpen,
    FetchError,
    HttpClient,
    HttpConfig,
    NotFound,
    RangeIgnored,
    RedirectRefused,
    ResponseTooLarge,
    RetryLater,
    RetryPolicy,
    TransientError,
    Unreachable,
    reset_server_states,
)
from weather_pipeline.core.idx import ByteRange
from weather_pipeline.mirror.server import MirrorServer

SIZE = 300_000


@pytest.fixture(autouse=True)
def fresh_breakers():
    """Circuit breakers are per process; every test starts with none."""
    reset_server_states()
    yield
    reset_server_states()


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


def make_client(sleep=None, config: dict | None = None, **retry) -> HttpClient:
    policy = RetryPolicy(**{"max_attempts": 4, "initial_wait": 1.0, "jitter": 0.5, **retry})
    return HttpClient(HttpConfig(**{"connect_timeout": 2, "read_timeout": 2, "retry": policy, **(config or {})}),
                      sleep=sleep or SleepRecorder())


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_unreachable_and_retried_then_fails():
    client = make_client(max_attempts=2)
    with pytest.raises(Unreachable, match="connection refused") as info:
        client.get_bytes(f"http://127.0.0.1:{_free_port()}/nothing", ByteRange(0, 9))
    assert not isinstance(info.value, CircuitOpen) and isinstance(info.value, TransientError)
    assert client.stats.requests == 2


def test_dns_failure_is_unreachable():
    client = make_client(max_attempts=1)
    with pytest.raises(Unreachable, match="DNS lookup failed for nosuch.invalid"):
        client.get_bytes("http://nosuch.invalid/file")


@pytest.fixture()
def blackhole():
    """A port whose connects time out: its listen queue is full and new SYNs are dropped."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=2)
    yield srv.getsockname()[1]
    filler.close()
    srv.close()


def test_connect_timeout_is_unreachable(blackhole):
    client = make_client(max_attempts=1, config={"connect_timeout": 0.3})
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match="connect timed out"):
        client.get_bytes(f"http://127.0.0.1:{blackhole}/x")
    assert time.monotonic() - t0 < 5


def test_circuit_opens_after_consecutive_unreachable_failures_and_answers_at_once():
    port = _free_port()
    url = f"http://127.0.0.1:{port}/f"
    sleep = SleepRecorder()
    client = make_client(sleep, max_attempts=10, config={"breaker_failures": 3, "breaker_cooldown_s": 60})
    with pytest.raises(Unreachable) as info:
        client.get_bytes(url)
    # three real attempts trip the breaker; the fourth is answered by it, and not retried
    assert client.stats.requests == 3 and isinstance(info.value, CircuitOpen)
    assert "connection refused" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    t0 = time.monotonic()
    for _ in range(20):
        with pytest.raises(CircuitOpen):
            make_client(config={"breaker_failures": 3, "breaker_cooldown_s": 60}).get_bytes(url + "?again")
    assert time.monotonic() - t0 < 1.0
    assert client.stats.requests == 3  # the open circuit cost no requests


def test_circuit_half_opens_after_the_cool_down_and_closes_when_the_server_answers(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_bytes(b"0123456789")
    port = _free_port()
    cfg = {"breaker_failures": 2, "breaker_cooldown_s": 0.5}
    client = make_client(max_attempts=1, config=cfg)
    url = f"http://127.0.0.1:{port}/b/f"
    for _ in range(2):
        with pytest.raises(Unreachable):
            client.get_bytes(url)
    with pytest.raises(CircuitOpen):
        client.get_bytes(url)
    with MirrorServer(tmp_path, port=port):
        time.sleep(0.6)
        assert client.get_bytes(url) == b"0123456789"  # the trial request
        assert client.get_bytes(url) == b"0123456789"


def test_answers_from_a_live_server_never_open_the_circuit(served):
    server, url, _ = served
    server.faults.add("bucket/*", "status", code=503, times=None)
    client = make_client(max_attempts=8, config={"breaker_failures": 2}, initial_wait=0.001, jitter=0)
    with pytest.raises(TransientError, match="HTTP 503") as info:
        client.get_bytes(url, ByteRange(0, 9))
    assert not isinstance(info.value, Unreachable) and client.stats.requests == 8
    server.faults.clear()
    for _ in range(3):
        assert not client.exists(url + ".missing")  # 404s are answers too


def test_retry_after_beyond_the_limit_fails_at_once_and_holds_off_the_server(served):
    server, url, data = served
    server.faults.add("bucket/*", "status", code=503, retry_after=3600, times=1)
    sleep = SleepRecorder()
    client = make_client(sleep)
    with pytest.raises(RetryLater, match="wait 3600 s") as info:
        client.get_bytes(url, ByteRange(0, 9))
    assert sleep.calls == [] and client.stats.requests == 1
    assert 3500 < (info.value.until.timestamp() - time.time()) <= 3600
    # the server is not asked again before that time, by any client of this process
    with pytest.raises(RetryLater, match="asked us to wait until"):
        make_client().get_bytes(url, ByteRange(0, 9))
    assert len(server.request_log) == 1


def test_a_trickling_body_fails_at_its_deadline(served):
    server, url, _ = served
    server.faults.add("bucket/*", "trickle", count=1, seconds=0.2, times=None)
    client = make_client(max_attempts=2, initial_wait=0.01, jitter=0,
                         config={"transfer_grace_s": 0.5, "min_transfer_rate": 1e9, "read_timeout": 5})
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="transfer too slow"):
        client.get_bytes(url, ByteRange(0, 9_999))
    assert time.monotonic() - t0 < 4  # two attempts of ~0.5 s, not 10,000 bytes x 0.2 s


def test_a_connection_reset_is_retried(served):
    server, url, data = served
    server.faults.add("bucket/*", "reset")
    client = make_client()
    assert client.get_bytes(url, ByteRange(0, 99)) == data[:100]
    assert client.stats.retries == 1


def test_an_open_ended_range_over_the_cap_is_refused_before_its_body(served):
    server, url, _ = served
    client = make_client()
    with pytest.raises(ResponseTooLarge, match="over the 1000 byte cap"):
        client.get_bytes(url, ByteRange(1000, None), max_bytes=1000)
    assert client.stats.bytes == 0 and client.stats.requests == 1


def test_a_body_over_the_cap_is_refused(served):
    server, url, _ = served
    client = make_client()
    with pytest.raises(ResponseTooLarge):
        client.get_bytes(url, max_bytes=SIZE - 1)


def test_range_past_the_end_names_the_range_and_the_file_size(served):
    server, url, _ = served
    with pytest.raises(FetchError, match=rf"416.*bytes={SIZE + 5}-{SIZE + 10}.*{SIZE} bytes") as info:
        make_client().get_bytes(url, ByteRange(SIZE + 5, SIZE + 10))
    assert not isinstance(info.value, TransientError)


def test_a_bad_url_scheme_is_a_permanent_error_not_a_transient_one():
    client = make_client()
    with pytest.raises(FetchError, match="InvalidSchema") as info:
        client.get_bytes("ftp://example.invalid/file")
    assert not isinstance(info.value, TransientError)


def test_redirect_to_another_host_is_refused_unless_allowed(served, tmp_path):
    server, url, data = served
    with MirrorServer(server.root) as other:
        other_url = other.url.replace("127.0.0.1", "localhost")
        server.faults.add("bucket/*", "redirect", location=other_url, times=None)
        with pytest.raises(RedirectRefused, match="another host 'localhost'"):
            make_client().get_bytes(url, ByteRange(0, 9))
        allowed = make_client(config={"redirect_hosts": frozenset({"localhost"})})
        assert allowed.get_bytes(url, ByteRange(0, 9)) == data[:10]
        assert other.request_log and other.request_log[0].status == 206


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
