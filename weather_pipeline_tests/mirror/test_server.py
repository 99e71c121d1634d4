"""Tests for the loopback S3-style mirror server and its fault injection.

Only ``http.client``/``urllib`` are used as clients: the project's download
client is what this server exists to test, so it must not be tested with it.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weather_pipeline.mirror.server import (
    FaultRule,
    MirrorServer,
    RangeNotSatisfiable,
    parse_range,
)

GRIB_KEY = "hrrr.20260512/conus/hrrr.t00z.wrfsfcf00.grib2"
IDX_KEY = GRIB_KEY + ".idx"
# Larger than the server's 256 KiB chunk so streaming crosses chunk boundaries.
DATA = random.Random(20260512).randbytes(300_000)
SIZE = len(DATA)
NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}


@pytest.fixture
def mirror_root(tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    grib = root / GRIB_KEY
    grib.parent.mkdir(parents=True)
    grib.write_bytes(DATA)
    (root / IDX_KEY).write_text("1:0:d=2026051200:TMP:2 m above ground:anl:\n")
    (root / "hrrr.20260512/alaska").mkdir()
    (root / "hrrr.20260512/alaska/hrrr.t00z.wrfsfcf00.ak.grib2").write_bytes(b"ak" * 10)
    (root / "gfs.20260512/00/atmos").mkdir(parents=True)
    (root / "gfs.20260512/00/atmos/gfs.t00z.pgrb2.0p25.f000").write_bytes(b"g" * 5)
    (root / "empty.20260101/nothing").mkdir(parents=True)  # no keys: not a prefix
    (root / "index.html").write_bytes(b"<html/>")
    # Something outside the root that traversal attempts would try to reach.
    (tmp_path / "secret.txt").write_bytes(b"top secret")
    return root


@pytest.fixture
def server(mirror_root: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_root) as srv:
        yield srv


def request(
    server: MirrorServer,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5,
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection; returns the response and its body."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def control(
    server: MirrorServer, method: str, endpoint: str, payload: object = None
) -> tuple[int, Any]:
    body = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    response, data = request(server, f"/_mirror/{endpoint}", method, headers, body)
    return response.status, json.loads(data)


# --------------------------------------------------------------------------
# parse_range
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("bytes=0-99", (0, 99)),
        ("bytes=10-10", (10, 10)),
        ("bytes=900-", (900, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),  # suffix longer than the object: whole object
        ("bytes=990-5000", (990, 999)),  # end clipped to the object
        (" Bytes = 5-6 ", (5, 6)),
        ("bytes=0-1,5-6", None),  # multi-range: whole body, like S3
        ("items=0-5", None),
        ("bytes=5-4", None),  # invalid, so ignored
        ("bytes=abc", None),
        ("bytes=-", None),
        ("bytes=²-3", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=1000-", 1000),
        ("bytes=5000-6000", 1000),
        ("bytes=-0", 1000),  # empty suffix
        ("bytes=0-", 0),  # nothing to send from an empty object
        ("bytes=-3", 0),
    ],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


# --------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------


def test_full_get_sends_file_and_s3_headers(server: MirrorServer, mirror_root: Path) -> None:
    response, body = request(server, "/" + GRIB_KEY)
    assert response.status == 200
    assert body == DATA
    assert response.getheader("Content-Length") == str(SIZE)
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("Content-Type") == "application/octet-stream"
    etag = response.getheader("ETag")
    assert etag and etag.startswith('"') and etag.endswith('"') and len(etag) == 34
    modified = email.utils.parsedate_to_datetime(response.getheader("Last-Modified"))
    assert int(modified.timestamp()) == int((mirror_root / GRIB_KEY).stat().st_mtime)


def test_etag_changes_when_file_changes(server: MirrorServer, mirror_root: Path) -> None:
    first, _ = request(server, "/" + IDX_KEY, "HEAD")
    path = mirror_root / IDX_KEY
    path.write_text("changed and longer\n")
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    second, _ = request(server, "/" + IDX_KEY, "HEAD")
    assert first.getheader("ETag") != second.getheader("ETag")


def test_head_sends_headers_without_body(server: MirrorServer) -> None:
    get, _ = request(server, "/" + GRIB_KEY)
    response, body = request(server, "/" + GRIB_KEY, "HEAD")
    assert response.status == 200
    assert body == b""
    for name in ("Content-Length", "ETag", "Last-Modified", "Accept-Ranges", "Content-Type"):
        assert response.getheader(name) == get.getheader(name)
    assert server.request_log[-1].body_bytes == 0


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        ("bytes=262100-262200", 262100, 262200),  # crosses the server's chunk boundary
        ("bytes=299000-", 299000, SIZE - 1),
        ("bytes=-1234", SIZE - 1234, SIZE - 1),
        ("bytes=299990-999999", 299990, SIZE - 1),
    ],
)
def test_range_forms(server: MirrorServer, range_header: str, start: int, end: int) -> None:
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": range_header})
    assert response.status == 206
    assert body == DATA[start : end + 1]
    assert response.getheader("Content-Range") == f"bytes {start}-{end}/{SIZE}"
    assert response.getheader("Content-Length") == str(end - start + 1)
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("ETag")


def test_range_past_end_is_416(server: MirrorServer) -> None:
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": f"bytes={SIZE}-"})
    assert response.status == 416
    assert response.getheader("Content-Range") == f"bytes */{SIZE}"
    assert b"<Code>InvalidRange</Code>" in body
    assert response.getheader("Content-Length") == str(len(body))


def test_multi_range_answers_whole_body(server: MirrorServer) -> None:
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": "bytes=0-1,5-6"})
    assert response.status == 200
    assert body == DATA


def test_if_range_mismatch_sends_whole_file(server: MirrorServer) -> None:
    head, _ = request(server, "/" + GRIB_KEY, "HEAD")
    stale, body = request(
        server, "/" + GRIB_KEY, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}
    )
    assert (stale.status, len(body)) == (200, SIZE)
    etag = head.getheader("ETag") or ""
    fresh, body = request(server, "/" + GRIB_KEY, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (fresh.status, body) == (206, DATA[:10])


def test_missing_key_is_404_no_such_key(server: MirrorServer) -> None:
    response, body = request(server, "/hrrr.20260512/conus/missing.grib2")
    assert response.status == 404
    root = ET.fromstring(body)
    assert root.tag == "Error"
    assert root.findtext("Code") == "NoSuchKey"
    assert root.findtext("Key") == "hrrr.20260512/conus/missing.grib2"


@pytest.mark.parametrize("path", ["/hrrr.20260512", "/hrrr.20260512/", "/hrrr.20260512/conus/"])
def test_directories_are_404(server: MirrorServer, path: str) -> None:
    response, body = request(server, path)
    assert response.status == 404
    assert b"NoSuchKey" in body


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/hrrr.20260512/../../secret.txt",
        "/hrrr.20260512/%2e%2e/%2e%2e/secret.txt",
        "/../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "//etc/passwd",
        "/link-out",
    ],
)
def test_path_traversal_is_404(server: MirrorServer, mirror_root: Path, path: str) -> None:
    # A symlink inside the root that points outside must not escape either.
    (mirror_root / "link-out").symlink_to(mirror_root.parent / "secret.txt")
    response, body = request(server, path)
    assert response.status == 404
    assert b"top secret" not in body and b"root:" not in body


def test_dot_segment_inside_root_is_not_resolved(server: MirrorServer) -> None:
    # S3 keys are literal; "a/./b" or "a/x/../b" is not the key "a/b".
    response, _ = request(server, "/hrrr.20260512/conus/./hrrr.t00z.wrfsfcf00.grib2")
    assert response.status == 404


def test_other_methods_are_405(server: MirrorServer) -> None:
    response, _ = request(server, "/" + GRIB_KEY, "PUT", body=b"x")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert (server.root / GRIB_KEY).read_bytes() == DATA


# --------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------


def list_xml(server: MirrorServer, path: str) -> ET.Element:
    """GET a listing URL (path and query) and return its ListBucketResult element."""
    response, body = request(server, path)
    assert response.status == 200, body
    assert response.getheader("Content-Type") == "application/xml"
    root = ET.fromstring(body)
    assert root.tag == f"{{{NS['s3']}}}ListBucketResult"
    return root


def list_bucket(
    server: MirrorServer, query: str, path: str = "/"
) -> tuple[list[str], dict[str, int]]:
    root = list_xml(server, f"{path}?{query}")
    assert root.findtext("s3:IsTruncated", namespaces=NS) == "false"
    prefixes = [p.text or "" for p in root.findall("s3:CommonPrefixes/s3:Prefix", NS)]
    contents = {
        c.findtext("s3:Key", namespaces=NS) or "": int(c.findtext("s3:Size", namespaces=NS) or -1)
        for c in root.findall("s3:Contents", NS)
    }
    assert int(root.findtext("s3:KeyCount", namespaces=NS) or -1) == len(prefixes) + len(contents)
    return prefixes, contents


def test_listing_root_with_delimiter(server: MirrorServer) -> None:
    prefixes, contents = list_bucket(server, "list-type=2&prefix=&delimiter=/")
    assert prefixes == ["gfs.20260512/", "hrrr.20260512/"]  # the empty dir is not a prefix
    assert contents == {"index.html": 7}


def test_listing_directory_prefix(server: MirrorServer) -> None:
    prefixes, contents = list_bucket(server, "list-type=2&prefix=hrrr.20260512/conus/&delimiter=/")
    assert prefixes == []
    assert contents == {GRIB_KEY: SIZE, IDX_KEY: len((server.root / IDX_KEY).read_bytes())}


def test_listing_partial_prefix(server: MirrorServer) -> None:
    prefixes, contents = list_bucket(server, "list-type=2&prefix=hrrr.2026&delimiter=/")
    assert (prefixes, contents) == (["hrrr.20260512/"], {})
    prefixes, _ = list_bucket(server, "list-type=2&prefix=hrrr.20260512/&delimiter=/")
    assert prefixes == ["hrrr.20260512/alaska/", "hrrr.20260512/conus/"]


def test_listing_without_delimiter_is_recursive(server: MirrorServer) -> None:
    prefixes, contents = list_bucket(server, "list-type=2&prefix=hrrr.")
    assert prefixes == []
    assert list(contents) == sorted(
        [GRIB_KEY, IDX_KEY, "hrrr.20260512/alaska/hrrr.t00z.wrfsfcf00.ak.grib2"]
    )


def test_listing_cannot_escape_root(server: MirrorServer) -> None:
    assert list_bucket(server, "list-type=2&prefix=../&delimiter=/") == ([], {})


# Path-style bucket listings: the top-level directories of the root act as buckets,
# as the catalog's mirror URLs ({mirror}/noaa-hrrr-bdp-pds) expect.

AK_KEY = "alaska/hrrr.t00z.wrfsfcf00.ak.grib2"
CONUS_GRIB = GRIB_KEY.removeprefix("hrrr.20260512/")


@pytest.mark.parametrize("path", ["/hrrr.20260512/", "/hrrr.20260512"])
def test_path_style_listing_has_keys_relative_to_the_bucket(
    server: MirrorServer, path: str
) -> None:
    root = list_xml(server, path + "?list-type=2&prefix=conus/hrrr.t00z.wrfsfcf")
    assert root.findtext("s3:Name", namespaces=NS) == "hrrr.20260512"
    assert root.findtext("s3:Prefix", namespaces=NS) == "conus/hrrr.t00z.wrfsfcf"
    _, contents = list_bucket(server, "list-type=2&prefix=conus/hrrr.t00z.wrfsfcf", path)
    assert contents == {
        CONUS_GRIB: SIZE,
        CONUS_GRIB + ".idx": len((server.root / IDX_KEY).read_bytes()),
    }


def test_path_style_listing_recursive_and_with_delimiter(server: MirrorServer) -> None:
    prefixes, contents = list_bucket(server, "list-type=2", "/hrrr.20260512/")
    assert prefixes == [] and list(contents) == sorted([CONUS_GRIB, CONUS_GRIB + ".idx", AK_KEY])
    prefixes, contents = list_bucket(server, "list-type=2&prefix=&delimiter=/", "/hrrr.20260512/")
    assert (prefixes, contents) == (["alaska/", "conus/"], {})
    # Another bucket sees only its own keys.
    _, contents = list_bucket(server, "list-type=2", "/gfs.20260512/")
    assert list(contents) == ["00/atmos/gfs.t00z.pgrb2.0p25.f000"]


def test_path_style_listing_of_a_bucket_without_keys_is_empty(server: MirrorServer) -> None:
    assert list_bucket(server, "list-type=2", "/empty.20260101/") == ([], {})


@pytest.mark.parametrize(
    "path",
    [
        "/hrrr.20260512/",  # a directory without list-type=2 is no object
        "/hrrr.20260512",
        "/hrrr.20260512/?list-type=1",
        "/hrrr.20260512/?prefix=conus/",
        "/hrrr.20260512/conus/?list-type=2",  # buckets are top-level only
        "/hrrr.20260512/conus?list-type=2",
        "/no-such-bucket/?list-type=2",
        "/../?list-type=2",
        "/link-dir/?list-type=2",  # a symlink to a directory outside the root
    ],
)
def test_directory_requests_that_are_not_bucket_listings_are_404(
    server: MirrorServer, mirror_root: Path, path: str
) -> None:
    (mirror_root / "link-dir").symlink_to(mirror_root.parent, target_is_directory=True)
    response, body = request(server, path)
    assert response.status == 404
    assert b"ListBucketResult" not in body and b"secret" not in body


def test_list_type_on_a_file_still_serves_the_file(server: MirrorServer) -> None:
    response, body = request(server, "/index.html?list-type=2")
    assert (response.status, body) == (200, b"<html/>")


def test_path_style_listing_prefix_cannot_escape_the_bucket(server: MirrorServer) -> None:
    assert list_bucket(server, "list-type=2&prefix=../", "/hrrr.20260512/") == ([], {})
    assert list_bucket(server, "list-type=2&prefix=../gfs", "/hrrr.20260512/") == ([], {})


def test_path_style_listing_can_be_faulted_by_bucket_glob(server: MirrorServer) -> None:
    rule = server.faults.add("hrrr.20260512/", "status", code=503)
    response, _ = request(server, "/hrrr.20260512/?list-type=2")
    assert response.status == 503 and rule.used == 1
    assert list_bucket(server, "list-type=2", "/hrrr.20260512/")[1]


def _all_pages(server: MirrorServer, path: str, query: str) -> list[tuple[list[str], bool]]:
    """Follow continuation tokens; returns (keys and prefixes, IsTruncated) per page."""
    pages: list[tuple[list[str], bool]] = []
    token = None
    while True:
        suffix = "" if token is None else "&" + urllib.parse.urlencode({"continuation-token": token})
        root = list_xml(server, f"{path}?{query}{suffix}")
        names = [k.text or "" for k in root.findall("s3:Contents/s3:Key", NS)]
        names += [p.text or "" for p in root.findall("s3:CommonPrefixes/s3:Prefix", NS)]
        truncated = root.findtext("s3:IsTruncated", namespaces=NS) == "true"
        assert int(root.findtext("s3:KeyCount", namespaces=NS) or -1) == len(names)
        pages.append((names, truncated))
        token = root.findtext("s3:NextContinuationToken", namespaces=NS)
        assert (token is not None) == truncated
        if not truncated:
            return pages
        assert len(pages) < 10, "pagination does not terminate"


def test_max_keys_pages_with_continuation_tokens(server: MirrorServer) -> None:
    pages = _all_pages(server, "/hrrr.20260512/", "list-type=2&max-keys=2")
    assert pages == [
        ([AK_KEY, CONUS_GRIB], True),
        ([CONUS_GRIB + ".idx"], False),
    ]
    root = list_xml(server, "/hrrr.20260512/?list-type=2&max-keys=2")
    assert root.findtext("s3:MaxKeys", namespaces=NS) == "2"


def test_max_keys_counts_common_prefixes_at_the_root(server: MirrorServer) -> None:
    pages = _all_pages(server, "/", "list-type=2&delimiter=/&max-keys=1")
    assert pages == [
        (["gfs.20260512/"], True),
        (["hrrr.20260512/"], True),
        (["index.html"], False),
    ]


def test_max_keys_larger_than_the_listing_is_one_page(server: MirrorServer) -> None:
    assert _all_pages(server, "/hrrr.20260512/", "list-type=2&max-keys=3") == [
        ([AK_KEY, CONUS_GRIB, CONUS_GRIB + ".idx"], False)
    ]


@pytest.mark.parametrize(
    "query", ["list-type=2&max-keys=-1", "list-type=2&max-keys=x", "list-type=2&continuation-token=%25"]
)
def test_bad_paging_parameters_are_400(server: MirrorServer, query: str) -> None:
    response, body = request(server, "/hrrr.20260512/?" + query)
    assert response.status == 400
    assert b"<Code>InvalidArgument</Code>" in body


# --------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------


def test_status_fault_with_retry_after_then_normal(server: MirrorServer) -> None:
    rule = server.faults.add("hrrr.20260512/conus/*.grib2", "status", code=503, retry_after=7)
    response, body = request(server, "/" + GRIB_KEY)
    assert response.status == 503
    assert response.getheader("Retry-After") == "7"
    assert b"<Code>SlowDown</Code>" in body and DATA[:64] not in body
    assert rule.used == 1
    response, body = request(server, "/" + GRIB_KEY)
    assert (response.status, body) == (200, DATA)


@pytest.mark.parametrize("code", [403, 404, 429, 500])
def test_status_fault_codes_without_retry_after(server: MirrorServer, code: int) -> None:
    server.faults.add("*", "status", code=code)
    response, _ = request(server, "/" + IDX_KEY)
    assert response.status == code
    assert response.getheader("Retry-After") is None


def test_glob_that_does_not_match_leaves_request_alone(server: MirrorServer) -> None:
    rule = server.faults.add("gfs.*", "status", code=500)
    response, _ = request(server, "/" + GRIB_KEY)
    assert response.status == 200
    assert rule.used == 0


def test_ignore_range_answers_200_whole_file(server: MirrorServer) -> None:
    server.faults.add("*", "ignore_range")
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": "bytes=10-19"})
    assert response.status == 200
    assert response.getheader("Content-Range") is None
    assert body == DATA
    # Used up: the next ranged request is honoured.
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": "bytes=10-19"})
    assert (response.status, body) == (206, DATA[10:20])


def test_ignore_range_is_not_used_by_unranged_request(server: MirrorServer) -> None:
    rule = server.faults.add("*", "ignore_range")
    request(server, "/" + GRIB_KEY)
    assert rule.used == 0


def test_truncate_sends_fewer_bytes_than_content_length(server: MirrorServer) -> None:
    server.faults.add("*.grib2", "truncate", keep_bytes=1000)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", "/" + GRIB_KEY, headers={"Range": "bytes=100-50099"})
    response = conn.getresponse()
    assert response.status == 206
    assert response.getheader("Content-Length") == "50000"
    with pytest.raises(http.client.IncompleteRead) as excinfo:
        response.read()
    assert excinfo.value.partial == DATA[100:1100]
    conn.close()
    record = server.request_log[-1]
    assert (record.fault, record.content_length, record.body_bytes) == ("truncate", 50000, 1000)


def test_truncate_defaults_to_half_and_head_does_not_use_it(server: MirrorServer) -> None:
    rule = server.faults.add("*", "truncate")
    head, _ = request(server, "/" + GRIB_KEY, "HEAD")
    assert head.status == 200 and rule.used == 0
    with pytest.raises(http.client.IncompleteRead) as excinfo:
        request(server, "/" + GRIB_KEY)
    assert excinfo.value.partial == DATA[: SIZE // 2]
    assert rule.used == 1


def test_corrupt_keeps_length_but_changes_middle_bytes(server: MirrorServer) -> None:
    server.faults.add("*", "corrupt", count=16, times=2)
    response, body = request(server, "/" + GRIB_KEY)
    assert response.status == 200
    assert len(body) == SIZE
    differing = [i for i in range(SIZE) if body[i] != DATA[i]]
    middle = (SIZE - 16) // 2
    assert differing == list(range(middle, middle + 16))
    # Deterministic: the same request corrupts the same way.
    _, again = request(server, "/" + GRIB_KEY)
    assert again == body


def test_corrupt_ranged_response(server: MirrorServer) -> None:
    server.faults.add("*", "corrupt", count=4)
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": "bytes=1000-1099"})
    assert response.status == 206
    expected = DATA[1000:1100]
    assert len(body) == 100 and body != expected
    assert body[:48] == expected[:48] and body[52:] == expected[52:]


def test_delay_causes_client_timeout(server: MirrorServer) -> None:
    server.faults.add("*", "delay", seconds=0.6)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        request(server, "/" + IDX_KEY, timeout=0.2)
    assert time.monotonic() - started < 0.5


def test_delay_then_normal_answer(server: MirrorServer) -> None:
    server.faults.add("*", "delay", seconds=0.3)
    started = time.monotonic()
    response, body = request(server, "/" + GRIB_KEY, headers={"Range": "bytes=0-9"})
    assert time.monotonic() - started >= 0.3
    assert (response.status, body) == (206, DATA[:10])
    assert server.request_log[-1].fault == "delay"


def test_redirect_points_to_same_path(server: MirrorServer) -> None:
    server.faults.add("*", "redirect")
    response, body = request(server, "/" + GRIB_KEY)
    assert response.status == 302
    assert body == b""
    assert response.getheader("Location") == f"{server.url}/{GRIB_KEY}?redirected=1"


def test_redirect_forever_does_not_loop_for_following_client(server: MirrorServer) -> None:
    server.faults.add("*", "redirect", times=None)
    with urllib.request.urlopen(f"{server.url}/{GRIB_KEY}", timeout=5) as response:
        assert response.status == 200
        assert response.read() == DATA
    assert [(r.status, r.query) for r in server.request_log] == [(302, ""), (200, "redirected=1")]


def test_times_counting_and_rule_order(server: MirrorServer) -> None:
    first = server.faults.add("*", "status", code=500, times=2)
    second = server.faults.add("*", "status", code=429)
    forever = server.faults.add("*.idx", "status", code=403, times=None)
    statuses = [request(server, "/" + GRIB_KEY)[0].status for _ in range(4)]
    assert statuses == [500, 500, 429, 200]
    assert (first.used, second.used) == (2, 1)
    assert [request(server, "/" + IDX_KEY)[0].status for _ in range(3)] == [403] * 3
    assert forever.used == 3
    server.faults.clear()
    assert request(server, "/" + IDX_KEY)[0].status == 200


def test_fault_rule_validation() -> None:
    with pytest.raises(ValueError):
        FaultRule("*", "explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultRule("*", "status", times=0)
    with pytest.raises(ValueError):
        FaultRule.from_dict({"mode": "status", "cod": 500})


# --------------------------------------------------------------------------
# Control endpoints, log, keep-alive, lifecycle
# --------------------------------------------------------------------------


def test_http_control_of_faults(server: MirrorServer) -> None:
    status, payload = control(
        server,
        "POST",
        "faults",
        [
            {"path_glob": "*.grib2", "mode": "status", "code": 503, "retry_after": 2},
            {"mode": "redirect", "times": None},
        ],
    )
    assert status == 200 and payload["added"] == 2
    assert len(server.faults) == 2
    response, _ = request(server, "/" + GRIB_KEY)
    assert (response.status, response.getheader("Retry-After")) == (503, "2")
    status, payload = control(server, "GET", "faults")
    assert [(r["mode"], r["used"], r["times"]) for r in payload["rules"]] == [
        ("status", 1, 1),
        ("redirect", 0, None),
    ]
    status, _ = control(server, "DELETE", "faults")
    assert status == 200 and len(server.faults) == 0
    assert request(server, "/" + GRIB_KEY)[0].status == 200


def test_http_control_rejects_bad_rules_atomically(server: MirrorServer) -> None:
    status, payload = control(server, "POST", "faults", [{"mode": "status"}, {"mode": "nonsense"}])
    assert status == 400 and "nonsense" in payload["error"]
    assert len(server.faults) == 0
    status, _ = control(server, "GET", "nothing-here")
    assert status == 404


def test_http_control_of_log(server: MirrorServer) -> None:
    request(server, "/" + GRIB_KEY, "HEAD")
    request(server, "/missing")
    status, records = control(server, "GET", "log")
    assert status == 200
    # Control requests themselves are not logged.
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("HEAD", "/" + GRIB_KEY, 200),
        ("GET", "/missing", 404),
    ]
    status, _ = control(server, "DELETE", "log")
    assert status == 200
    assert server.request_log == []
    assert control(server, "GET", "log")[1] == []


def test_request_log_records_details_and_clears(server: MirrorServer) -> None:
    server.faults.add("*", "status", code=500)
    request(server, "/" + GRIB_KEY)
    request(server, "/" + GRIB_KEY, headers={"Range": "bytes=5-14"})
    log = server.request_log
    assert [(r.method, r.path, r.range, r.status, r.fault) for r in log] == [
        ("GET", "/" + GRIB_KEY, None, 500, "status"),
        ("GET", "/" + GRIB_KEY, "bytes=5-14", 206, None),
    ]
    assert log[1].body_bytes == 10 and log[1].content_length == 10
    assert log[0].started <= log[1].started
    server.clear_log()
    assert server.request_log == []


def test_keep_alive_reuses_one_connection(server: MirrorServer) -> None:
    server.faults.add("*.idx", "status", code=503)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/" + GRIB_KEY, headers={"Range": "bytes=0-99"})
        first = conn.getresponse()
        assert (first.status, first.read()) == (206, DATA[:100])
        sock = conn.sock
        assert sock is not None
        # Error answers (injected or not) must keep the connection usable too.
        for path, expected in [("/" + IDX_KEY, 503), ("/missing", 404), ("/" + GRIB_KEY, 200)]:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == expected
            assert conn.sock is sock  # http.client would have reconnected otherwise
    finally:
        conn.close()
    assert len(server.request_log) == 4


def test_stop_closes_listening_socket_and_idle_connections(mirror_root: Path) -> None:
    srv = MirrorServer(mirror_root).start()
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    conn.request("GET", "/" + IDX_KEY)
    conn.getresponse().read()
    srv.stop()
    srv.stop()  # idempotent
    assert conn.sock is not None and conn.sock.recv(1) == b""  # server hung up
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), timeout=1).close()


def test_url_and_port(server: MirrorServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.port > 0
    with urllib.request.urlopen(f"{server.url}/{IDX_KEY}", timeout=5) as response:
        assert response.read() == (server.root / IDX_KEY).read_bytes()


def test_quiet_by_default_and_verbose_logs_requests(
    mirror_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MirrorServer(mirror_root) as quiet:
        request(quiet, "/missing")
        quiet.request_log  # wait until the handler has finished
    assert capsys.readouterr().err == ""
    with MirrorServer(mirror_root, verbose=True) as loud:
        request(loud, "/missing")
        loud.request_log
    err = capsys.readouterr().err
    assert "GET /missing" in err and "404" in err


def test_urllib_sees_http_errors(server: MirrorServer) -> None:
    server.faults.add("*", "status", code=429, retry_after="3")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"{server.url}/{GRIB_KEY}", timeout=5)
    assert excinfo.value.code == 429
    assert excinfo.value.headers["Retry-After"] == "3"
    excinfo.value.close()
