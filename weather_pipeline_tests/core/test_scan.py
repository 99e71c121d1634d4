"""ScanSource core: candidate runs, published hours (S3 listing and HEAD probing against the
loopback mirror), the availability file, and hour batching."""

from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import Catalog, InvalidRequest, build_catalog, load_catalog
from weather_pipeline.core.http import FetchStats, HttpClient, HttpConfig, RetryPolicy
from weather_pipeline.core.scan import (
    RunAvailability,
    candidate_runs,
    contiguous_batches,
    load_availability,
    parse_list_objects,
    published_hours,
    save_availability,
)
from weather_pipeline.core.sources import SourceSettings
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline_tests.mirror_fixtures import GFS_HOURS, GFS_RUN, HRRR_HOURS, HRRR_RUN

NOW = datetime(2026, 5, 12, 3, 30, tzinfo=timezone.utc)
HRRR = load_catalog().model("hrrr")
GFS = load_catalog().model("gfs")
HRRR_BUCKET = "noaa-hrrr-bdp-pds"


def _client(max_attempts: int = 3) -> HttpClient:
    return HttpClient(HttpConfig(retry=RetryPolicy(max_attempts=max_attempts, initial_wait=0.01, jitter=0.01)))


def _mirror_settings(server: MirrorServer, *order: str) -> SourceSettings:
    return SourceSettings(order=order or ("mirror",), mirror_url=server.url)


def _catalog_with(**changes: Any) -> Catalog:
    """The embedded catalog with extra sources (name -> (source entry, hrrr URL template))
    or, for `mirror_listing=None`, the mirror's S3 listing removed."""
    raw = copy.deepcopy(dict(load_catalog().raw))
    if "mirror_listing" in changes and changes.pop("mirror_listing") is None:
        del raw["sources"]["mirror"]["listing"]
    for name, (entry, url) in changes.items():
        raw["sources"][name] = entry
        raw["models"]["hrrr"]["urls"][name] = url
    return build_catalog(raw)


# ------------------------------------------------------------------------------------------
# candidate_runs
# ------------------------------------------------------------------------------------------


def test_candidate_runs_hrrr_hourly_newest_first() -> None:
    assert candidate_runs(HRRR, NOW) == [
        "20260512_03", "20260512_02", "20260512_01", "20260512_00", "20260511_23", "20260511_22",
    ]
    assert candidate_runs("hrrr", NOW, lookback_hours=2) == ["20260512_03", "20260512_02"]
    assert candidate_runs(HRRR, NOW, lookback_hours=0) == []


def test_candidate_runs_window_is_open_below_and_closed_above() -> None:
    at_the_hour = datetime(2026, 5, 12, 12, tzinfo=timezone.utc)
    # GFS looks back 12 h: the 12z run (run time == now) is in, the 00z run (now - 12 h) is out.
    assert candidate_runs(GFS, at_the_hour) == ["20260512_12", "20260512_06"]
    assert candidate_runs(GFS, at_the_hour + timedelta(seconds=1)) == ["20260512_12", "20260512_06"]
    assert candidate_runs(GFS, at_the_hour - timedelta(seconds=1)) == ["20260512_06", "20260512_00"]
    assert candidate_runs(GFS, at_the_hour, lookback_hours=24) == [
        "20260512_12", "20260512_06", "20260512_00", "20260511_18",
    ]


def test_candidate_runs_converts_to_utc_and_rejects_naive_times() -> None:
    eastern = timezone(timedelta(hours=-4))
    assert candidate_runs(GFS, datetime(2026, 5, 12, 2, 0, tzinfo=eastern), lookback_hours=6) == ["20260512_06"]
    with pytest.raises(ValueError, match="naive"):
        candidate_runs(GFS, datetime(2026, 5, 12, 12))


# ------------------------------------------------------------------------------------------
# published_hours: S3 listing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "run", "hours", "bucket", "prefix"),
    [
        ("hrrr", HRRR_RUN, HRRR_HOURS, HRRR_BUCKET, "hrrr.20260512/conus/hrrr.t00z.wrfsfcf"),
        ("gfs", GFS_RUN, GFS_HOURS, "noaa-gfs-bdp-pds", "gfs.20260512/06/atmos/gfs.t06z.pgrb2.0p25.f"),
    ],
)
def test_listing_finds_exactly_the_generated_hours_in_one_request(
    mirror: MirrorServer, model: str, run: str, hours: tuple[int, ...], bucket: str, prefix: str
) -> None:
    client = _client()
    got = published_hours(model, run, client, _mirror_settings(mirror), now=NOW)
    expected = load_catalog().model(model).hours_for_run(run)
    assert (got.model, got.run, got.source) == (model, run, "mirror")
    assert got.hours == hours
    assert got.expected == expected and got.missing == expected[len(hours):]
    assert not got.complete and not got.truncated and got.error is None
    assert got.requests == 1 == client.stats.requests
    (record,) = mirror.request_log
    assert (record.method, record.path, record.status) == ("GET", f"/{bucket}/", 200)
    assert parse_qs(record.query) == {"list-type": ["2"], "prefix": [prefix]}
    assert got.checked_at == "2026-05-12T03:30:00Z"


def test_listing_of_a_run_not_published_has_no_hours(mirror: MirrorServer) -> None:
    got = published_hours("hrrr", "20260512_01", _client(), _mirror_settings(mirror), now=NOW)
    assert (got.source, got.hours, got.requests, got.truncated) == ("mirror", (), 1, False)
    assert got.expected == tuple(range(19))  # an off-synoptic HRRR run goes to 18 h


@pytest.fixture(scope="module")
def scratch_root(mirror_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared HRRR run whose f01 has no .idx and whose f02 has no GRIB, plus an
    unrelated bucket; copied (not regenerated) because generation costs seconds per hour."""
    root = tmp_path_factory.mktemp("scan-mirror")
    shutil.copytree(mirror_root / HRRR_BUCKET, root / HRRR_BUCKET)
    conus = root / HRRR_BUCKET / "hrrr.20260512" / "conus"
    (conus / "hrrr.t00z.wrfsfcf01.grib2.idx").unlink()
    (conus / "hrrr.t00z.wrfsfcf02.grib2").unlink()
    (root / "stale-bucket").mkdir()
    (root / "stale-bucket" / "README").write_text("nothing of this run here\n")
    return root


@pytest.fixture()
def scratch(scratch_root: Path) -> Iterator[MirrorServer]:
    with MirrorServer(scratch_root) as server:
        yield server


def test_an_hour_counts_only_with_both_grib_and_idx_listed(scratch: MirrorServer) -> None:
    got = published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(scratch), now=NOW)
    # f01: GRIB without .idx (still being written); f02: .idx without GRIB.
    assert got.hours == (0,)
    assert got.requests == 1


def test_transient_503_on_the_listing_is_retried(mirror: MirrorServer) -> None:
    rule = mirror.faults.add(f"{HRRR_BUCKET}/", "status", code=503, retry_after=0)
    got = published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(mirror), now=NOW)
    assert rule.used == 1
    assert got.hours == HRRR_HOURS and got.error is None and not got.truncated
    assert got.requests == 2  # the failed attempt is part of what the check cost
    assert [r.status for r in mirror.request_log] == [503, 200]


def test_a_listing_that_keeps_failing_is_reported_not_raised(mirror: MirrorServer) -> None:
    mirror.faults.add(f"{HRRR_BUCKET}/", "status", code=503, retry_after=0, times=None)
    got = published_hours("hrrr", HRRR_RUN, _client(max_attempts=2), _mirror_settings(mirror), now=NOW)
    assert (got.source, got.hours, got.truncated, got.requests) == ("mirror", (), True, 2)
    assert got.error is not None and "503" in got.error and got.error.startswith("mirror: ")


def test_pagination_follows_continuation_tokens(mirror: MirrorServer) -> None:
    # GFS f000, f001 and their .idx: four keys, one per page.
    got = published_hours("gfs", GFS_RUN, _client(), _mirror_settings(mirror), now=NOW, page_size=1)
    assert got.hours == GFS_HOURS and not got.truncated
    assert got.requests == 4
    queries = [parse_qs(r.query) for r in mirror.request_log]
    assert [q.get("continuation-token") is None for q in queries] == [True, False, False, False]
    assert all(q["max-keys"] == ["1"] for q in queries)


def test_pagination_stops_at_the_request_budget(mirror: MirrorServer) -> None:
    got = published_hours(
        "gfs", GFS_RUN, _client(), _mirror_settings(mirror), now=NOW, page_size=1, max_requests=2
    )
    # Two pages seen: f000 and its .idx; f001 might exist, so the answer says it stopped short.
    assert got.hours == (0,)
    assert got.truncated and got.error is None
    assert got.requests == 2 == len(mirror.request_log)


class _PagedClient:
    """Answers listing URLs from canned pages keyed by continuation token (None: first)."""

    def __init__(self, pages: dict[str | None, str]):
        self.pages = pages
        self.stats = FetchStats()
        self.urls: list[str] = []

    def get_bytes(self, url: str) -> bytes:
        self.stats.add(requests=1)
        self.urls.append(url)
        token = parse_qs(urlsplit(url).query).get("continuation-token", [None])[0]
        return self.pages[token].encode()


def _contents(*keys: str) -> str:
    return "".join(f"<Contents><Key>{k}</Key><Size>1</Size></Contents>" for k in keys)


def test_two_page_listing_with_and_without_namespace() -> None:
    path = HRRR.relative_path(HRRR_RUN, 0)
    token = "1/ab+c==d"  # S3 tokens are base64: "+", "/" and "=" must survive the query string
    pages = {
        None: (
            '<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<IsTruncated>true</IsTruncated>{_contents(path)}"
            f"<NextContinuationToken>{token}</NextContinuationToken></ListBucketResult>"
        ),
        token: f"<ListBucketResult><IsTruncated>false</IsTruncated>{_contents(path + '.idx')}</ListBucketResult>",
    }
    client = _PagedClient(pages)
    settings = SourceSettings(order=("mirror",), mirror_url="http://fake")
    got = published_hours("hrrr", HRRR_RUN, client, settings, now=NOW)  # type: ignore[arg-type]
    assert got.hours == (0,) and got.requests == 2 and not got.truncated
    assert client.urls[0].startswith("http://fake/noaa-hrrr-bdp-pds/?list-type=2&prefix=hrrr.20260512/conus/")
    assert "continuation-token=1/ab%2Bc%3D%3Dd" in client.urls[1]


def test_truncated_page_without_token_stops_instead_of_looping() -> None:
    page = f"<ListBucketResult><IsTruncated>true</IsTruncated>{_contents('x')}</ListBucketResult>"
    client = _PagedClient({None: page})
    settings = SourceSettings(order=("mirror",), mirror_url="http://fake")
    got = published_hours("hrrr", HRRR_RUN, client, settings, now=NOW)  # type: ignore[arg-type]
    assert got.requests == 1 and got.truncated and "NextContinuationToken" in (got.error or "")


def test_parse_list_objects() -> None:
    page = parse_list_objects(
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
        b"<IsTruncated>false</IsTruncated>" + _contents("a/1", "a/2").encode()
        + b"<CommonPrefixes><Prefix>a/x/</Prefix></CommonPrefixes></ListBucketResult>"
    )
    assert (page.keys, page.is_truncated, page.next_token) == (("a/1", "a/2"), False, None)
    with pytest.raises(ValueError, match="Error"):
        parse_list_objects("<Error><Code>AccessDenied</Code></Error>")
    with pytest.raises(ValueError, match="not XML"):
        parse_list_objects("<html><body>Index of /")


def test_an_html_answer_to_the_listing_is_an_error_not_a_crash() -> None:
    client = _PagedClient({None: "<html><body><h1>Index of /pub</h1></body></html>"})
    settings = SourceSettings(order=("mirror",), mirror_url="http://fake")
    got = published_hours("hrrr", HRRR_RUN, client, settings, now=NOW)  # type: ignore[arg-type]
    assert got.hours == () and got.truncated and "not an S3 listing" in (got.error or "")


# ------------------------------------------------------------------------------------------
# published_hours: HEAD probing (sources without a listing)
# ------------------------------------------------------------------------------------------

NO_LISTING = _catalog_with(mirror_listing=None)


def _heads(server: MirrorServer) -> list[tuple[str, int]]:
    return [(r.path.rsplit("/", 1)[-1], r.status) for r in server.request_log if r.method == "HEAD"]


def test_probing_stops_at_the_first_missing_hour(scratch: MirrorServer) -> None:
    got = published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(scratch), now=NOW, catalog=NO_LISTING)
    assert got.hours == (0,) and not got.truncated
    # f02's .idx exists, but f01 is missing, so nothing after it is asked for.
    assert _heads(scratch) == [("hrrr.t00z.wrfsfcf00.grib2.idx", 200), ("hrrr.t00z.wrfsfcf01.grib2.idx", 404)]
    assert got.requests == 2 == len(scratch.request_log)


def test_probing_finds_every_published_hour(mirror: MirrorServer) -> None:
    got = published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(mirror), now=NOW, catalog=NO_LISTING)
    assert got.hours == HRRR_HOURS and not got.truncated
    assert got.requests == 4  # three present, one missing
    assert all(name.endswith(".grib2.idx") for name, _ in _heads(mirror))


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_probing_respects_max_requests(mirror: MirrorServer, budget: int) -> None:
    got = published_hours(
        "hrrr", HRRR_RUN, _client(), _mirror_settings(mirror), now=NOW, catalog=NO_LISTING, max_requests=budget
    )
    assert got.hours == HRRR_HOURS[:budget]
    assert got.truncated  # the budget ran out before a missing hour was seen
    assert got.requests == budget == len(mirror.request_log)


def test_probing_resumes_after_known_hours(mirror: MirrorServer) -> None:
    got = published_hours(
        "hrrr", HRRR_RUN, _client(), _mirror_settings(mirror), now=NOW, catalog=NO_LISTING,
        known_hours={0, 1}, max_requests=2,
    )
    assert got.hours == HRRR_HOURS and not got.truncated
    assert [name for name, _ in _heads(mirror)] == ["hrrr.t00z.wrfsfcf02.grib2.idx", "hrrr.t00z.wrfsfcf03.grib2.idx"]


def test_max_requests_must_allow_a_request(mirror: MirrorServer) -> None:
    with pytest.raises(ValueError):
        published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(mirror), now=NOW, max_requests=0)


# ------------------------------------------------------------------------------------------
# published_hours: several sources
# ------------------------------------------------------------------------------------------

MULTI = _catalog_with(
    stale=({"title": "a bucket without this run", "listing": "s3"}, "{mirror}/stale-bucket"),
    nobucket=({"title": "a bucket that does not exist", "listing": "s3"}, "{mirror}/no-such-bucket"),
)


def test_a_source_without_the_run_hands_over_to_the_next(scratch: MirrorServer) -> None:
    got = published_hours(
        "hrrr", HRRR_RUN, _client(), _mirror_settings(scratch, "stale", "mirror"), now=NOW, catalog=MULTI
    )
    assert (got.source, got.hours, got.requests) == ("mirror", (0,), 2)
    assert [r.path for r in scratch.request_log] == ["/stale-bucket/", f"/{HRRR_BUCKET}/"]


def test_no_source_has_the_run_reports_the_last_one_asked(scratch: MirrorServer) -> None:
    got = published_hours(
        "hrrr", "20260512_01", _client(), _mirror_settings(scratch, "mirror", "stale"), now=NOW, catalog=MULTI
    )
    assert (got.source, got.hours, got.requests, got.truncated) == ("stale", (), 2, False)


def test_the_budget_is_shared_by_all_sources(scratch: MirrorServer) -> None:
    got = published_hours(
        "hrrr", HRRR_RUN, _client(), _mirror_settings(scratch, "stale", "mirror"), now=NOW, catalog=MULTI,
        max_requests=1,
    )
    # The stale bucket spent the only request; the mirror was never asked, so the answer is partial.
    assert (got.source, got.hours, got.requests, got.truncated) == ("stale", (), 1, True)


def test_a_bucket_refusing_the_listing_is_probed_instead(scratch: MirrorServer) -> None:
    got = published_hours(
        "hrrr", HRRR_RUN, _client(), _mirror_settings(scratch, "nobucket"), now=NOW, catalog=MULTI
    )
    assert (got.source, got.hours, got.error) == ("nobucket", (), None)
    assert [(r.method, r.status) for r in scratch.request_log] == [("GET", 404), ("HEAD", 404)]
    assert got.requests == 2


def test_no_source_can_have_the_run_costs_nothing() -> None:
    client = _client()
    late = datetime(2026, 5, 20, tzinfo=timezone.utc)  # NOMADS keeps 36 h
    got = published_hours("hrrr", HRRR_RUN, client, SourceSettings(order=("nomads",)), now=late)
    assert (got.source, got.hours, got.requests, got.truncated) == (None, (), 0, False)
    assert client.stats.requests == 0
    assert got.expected == HRRR.hours_for_run(HRRR_RUN) and got.missing == got.expected


def test_invalid_run_is_rejected_before_any_request(mirror: MirrorServer) -> None:
    with pytest.raises(InvalidRequest):
        published_hours("gfs", "20260512_03", _client(), _mirror_settings(mirror), now=NOW)
    assert mirror.request_log == []


# ------------------------------------------------------------------------------------------
# The availability file
# ------------------------------------------------------------------------------------------


def _avail(run: str, hours: tuple[int, ...], checked_at: str = "2026-05-12T03:30:00Z", **kw: Any) -> RunAvailability:
    return RunAvailability(
        model="hrrr", run=run, source="aws", hours=hours, expected=HRRR.hours_for_run(run),
        checked_at=checked_at, requests=1, **kw,
    )


def test_run_availability_json_round_trip_and_properties() -> None:
    a = _avail("20260512_06", (0, 1, 2), truncated=True, error="nomads: HTTP 503")
    data = json.loads(json.dumps(a.as_json()))
    assert data["complete"] is False and data["hours"] == [0, 1, 2]
    assert RunAvailability.from_json(data) == a
    assert a.missing == tuple(range(3, 49))
    full = _avail("20260512_01", tuple(range(19)))
    assert full.complete and full.missing == ()
    with pytest.raises(InvalidRequest):
        RunAvailability.from_json({**data, "run": "2026-05-12"})


def test_save_and_load_round_trip(tmp_path: Path, mirror: MirrorServer) -> None:
    cache = CacheLayout(tmp_path / "cache")
    assert load_availability(cache, "hrrr") == {}
    found = published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(mirror), now=NOW)
    other = _avail("20260512_01", ())
    merged = save_availability(cache, [found, other], now=NOW)
    path = cache.source_availability_path("hrrr")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["hrrr.json"]  # no temp left
    loaded = load_availability(cache, HRRR)
    assert loaded == {"20260512_01": other, HRRR_RUN: found} == merged["hrrr"]
    assert list(loaded) == ["20260512_01", HRRR_RUN]  # newest first
    doc = json.loads(path.read_text())
    assert doc["model"] == "hrrr" and doc["runs"][HRRR_RUN]["hours"] == [0, 1, 2]


def test_save_merges_with_what_is_there(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    save_availability(cache, [_avail("20260512_00", (0,)), _avail("20260512_01", (0,))], now=NOW)
    newer = _avail("20260512_00", (0, 1, 2), "2026-05-12T03:35:00Z")
    save_availability(cache, [newer, _avail("20260512_02", ())], now=NOW)
    assert {run: a.hours for run, a in load_availability(cache, "hrrr").items()} == {
        "20260512_02": (), "20260512_01": (0,), "20260512_00": (0, 1, 2),
    }
    # An older check, or a failed one that saw less, does not overwrite what is known...
    stale = _avail("20260512_00", (0,), "2026-05-12T03:31:00Z")
    failed = _avail("20260512_00", (), "2026-05-12T03:40:00Z", truncated=True, error="aws: HTTP 503")
    save_availability(cache, [stale, failed], now=NOW)
    assert load_availability(cache, "hrrr")["20260512_00"] == newer
    # ...but a later successful one does, and so does a failed one that saw more.
    more = _avail("20260512_00", (0, 1, 2, 3), "2026-05-12T03:41:00Z", truncated=True, error="x")
    save_availability(cache, [more], now=NOW)
    assert load_availability(cache, "hrrr")["20260512_00"] == more


def test_save_prunes_runs_past_retention(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    runs = ["20260510_00", "20260510_01", "20260510_02", "20260512_00"]
    # HRRR keeps 48 h: at 2026-05-12 01:00 the 01z run of the 10th is exactly 48 h old.
    merged = save_availability(cache, [_avail(r, ()) for r in runs], now=datetime(2026, 5, 12, 1, tzinfo=timezone.utc))
    assert list(merged["hrrr"]) == ["20260512_00", "20260510_02"]
    assert list(load_availability(cache, "hrrr")) == ["20260512_00", "20260510_02"]
    # Pruning also applies to runs stored earlier, when a later save moves `now` on.
    save_availability(cache, [], now=datetime(2026, 5, 14, 1, tzinfo=timezone.utc))  # no models: no write
    assert list(load_availability(cache, "hrrr")) == ["20260512_00", "20260510_02"]
    save_availability(cache, [_avail("20260514_00", ())], now=datetime(2026, 5, 14, 1, tzinfo=timezone.utc))
    assert list(load_availability(cache, "hrrr")) == ["20260514_00"]


def test_one_file_per_model_and_gfs_retention(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    gfs = RunAvailability("gfs", "20260509_06", "aws", (0,), GFS.hours_for_run("20260509_06"), "2026-05-12T03:30:00Z")
    save_availability(cache, [gfs, _avail("20260509_06", ())], now=NOW)  # 93.5 h old
    assert list(load_availability(cache, "gfs")) == ["20260509_06"]  # GFS keeps 96 h
    assert load_availability(cache, "hrrr") == {}  # HRRR keeps 48 h
    assert sorted(p.name for p in cache.source_availability_path("gfs").parent.iterdir()) == ["gfs.json", "hrrr.json"]


def test_unreadable_file_is_treated_as_empty_and_rewritten(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    path = cache.source_availability_path("hrrr")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert load_availability(cache, "hrrr") == {}
    save_availability(cache, [_avail("20260512_00", (0,))], now=NOW)
    assert list(load_availability(cache, "hrrr")) == ["20260512_00"]


# ------------------------------------------------------------------------------------------
# contiguous_batches
# ------------------------------------------------------------------------------------------


def test_contiguous_batches_hrrr() -> None:
    assert contiguous_batches([5, 0, 1, 2, 7, 8, 8], HRRR) == [[0, 1, 2], [5], [7, 8]]
    assert contiguous_batches([], HRRR) == []
    assert contiguous_batches(list(range(49)), HRRR) == [list(range(49))]


def test_contiguous_batches_gfs_across_the_three_hourly_step() -> None:
    assert contiguous_batches([118, 119, 120, 123, 126, 132], GFS) == [[118, 119, 120, 123, 126], [132]]
    assert contiguous_batches([119, 123], GFS) == [[119], [123]]  # 120 missing
    assert contiguous_batches((123, 120), GFS) == [[120, 123]]
    with pytest.raises(InvalidRequest, match="121"):
        contiguous_batches([120, 121], GFS)


# ------------------------------------------------------------------------------------------
# Unreachable sources: never "nothing published"
# ------------------------------------------------------------------------------------------


def _dead_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def fresh_breakers():
    from weather_pipeline.core.http import reset_server_states

    reset_server_states()
    yield
    reset_server_states()


def test_an_unreachable_source_is_not_an_empty_one(fresh_breakers, tmp_path) -> None:
    catalog = _catalog_with(dead=({"title": "refuses connections", "listing": "s3"}, f"{_dead_url()}/{HRRR_BUCKET}"))
    got = published_hours("hrrr", HRRR_RUN, _client(), SourceSettings(order=("dead",)), now=NOW, catalog=catalog)
    assert not got.answered and got.unreachable == ("dead",) and got.hours == ()
    assert "connection refused" in (got.error or "")
    # The stored record of what the source had is kept; the source is recorded as unreachable.
    layout = CacheLayout(tmp_path)
    good = RunAvailability("hrrr", HRRR_RUN, "dead", (0, 1, 2), HRRR.hours_for_run(HRRR_RUN), "2026-05-12T03:00:00Z")
    save_availability(layout, [good], now=NOW, catalog=catalog)
    save_availability(layout, [got], now=NOW, catalog=catalog)
    assert load_availability(layout, "hrrr")[HRRR_RUN].hours == (0, 1, 2)
    from weather_pipeline.core.scan import load_source_health

    health = load_source_health(layout, "hrrr")["dead"]
    assert not health.reachable and "connection refused" in health.error and health.last_reachable_at == "2026-05-12T03:30:00Z"


def test_an_unreachable_source_fails_over_to_the_next(fresh_breakers, mirror) -> None:
    catalog = _catalog_with(dead=({"title": "refuses connections", "listing": "s3"}, f"{_dead_url()}/{HRRR_BUCKET}"))
    got = published_hours("hrrr", HRRR_RUN, _client(), _mirror_settings(mirror, "dead", "mirror"), now=NOW, catalog=catalog)
    assert got.answered and got.source == "mirror" and got.hours == HRRR_HOURS and got.unreachable == ("dead",)
