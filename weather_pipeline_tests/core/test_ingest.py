"""IngestGrib through the real HTTP code against the loopback mirror."""

from __future__ import annotations

from datetime import datetime, timezone

import eccodes
import pytest

from weather_pipeline.core import grib
from weather_pipeline.core.cache import CacheLayout, md5_file
from weather_pipeline.core.catalog import CatalogError, InvalidRequest, load_catalog
from weather_pipeline.core.http import HttpClient, HttpConfig, RangeIgnored, RetryPolicy, TransientError
from weather_pipeline.core.idx import parse_idx
from weather_pipeline.core.ingest import HourNotPublished, ingest_hour
from weather_pipeline.core.sources import SourceSettings, SourceUnavailable
from weather_pipeline_tests.mirror_fixtures import GFS_RUN, HRRR_RUN

NOW = datetime(2026, 5, 12, 12, tzinfo=timezone.utc)


def _client() -> HttpClient:
    return HttpClient(HttpConfig(retry=RetryPolicy(max_attempts=3, initial_wait=0.01, jitter=0.01)))


def _ingest(mirror, cache, model="hrrr", run=HRRR_RUN, hour=1, **kw):
    settings = SourceSettings(order=("mirror",), mirror_url=mirror.url)
    client = kw.pop("client", None) or _client()
    return ingest_hour(model, run, hour, cache=cache, client=client, settings=settings, now=NOW, **kw), client


def _all_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_hrrr_hour_lands_one_verified_file_per_variable(mirror, tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    report, client = _ingest(mirror, cache)
    model = load_catalog().model("hrrr")
    assert {v.variable for v in report.variables} == {v.name for v in model.default_variables}
    for v in report.variables:
        path = cache.grib_path("hrrr", HRRR_RUN, v.variable, 1)
        assert str(path) == v.path and path.is_file()
        assert md5_file(path) == v.md5
        assert grib.verify_messages(path.read_bytes(), source=str(path), expected=1) == 1
        # What landed is the field the catalog asked for: its own inventory line matches.
        (line,) = grib.build_index(path.read_bytes()).splitlines()
        assert model.variable(v.variable).pattern.search(line), line
    assert report.variables[0].description
    # Byte-exact subsetting: nothing fetched beyond the messages and the .idx.
    idx_url = report.url + ".idx"
    idx_size = len(client.get_text(idx_url).encode())
    assert report.bytes_fetched == report.message_bytes + idx_size
    assert report.grib_requests == report.message_groups < len(report.variables)  # U and V merged
    assert report.requests == report.grib_requests + 1


def test_the_subset_equals_the_bytes_noaa_published(mirror, mirror_root, tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    report, _ = _ingest(mirror, cache, hour=2)
    model = load_catalog().model("hrrr")
    source = next(mirror_root.rglob(model.relative_path(HRRR_RUN, 2).split("/")[-1]))
    whole = source.read_bytes()
    entries = parse_idx((source.parent / (source.name + ".idx")).read_text(), file_size=len(whole))
    t2m = next(e for e in entries if model.variable("t2m").pattern.search(e.line))
    assert cache.grib_path("hrrr", HRRR_RUN, "t2m", 2).read_bytes() == whole[t2m.start : t2m.end + 1]


def test_gfs_analysis_hour_skips_precipitation_with_a_reason(mirror, tmp_path):
    report, _ = _ingest(mirror, CacheLayout(tmp_path), model="gfs", run=GFS_RUN, hour=0)
    assert "apcp" in report.skipped and "from hour 1" in report.skipped["apcp"]
    assert "apcp" not in {v.variable for v in report.variables}
    assert len(report.variables) == 5


def test_missing_idx_falls_back_to_a_full_download_indexed_locally(mirror, tmp_path):
    normal, _ = _ingest(mirror, CacheLayout(tmp_path / "a"))
    mirror.faults.add("*.idx", "status", code=404, times=None)
    fallback, _ = _ingest(mirror, CacheLayout(tmp_path / "b"))
    assert fallback.index.startswith("built locally")
    assert {v.variable: v.md5 for v in fallback.variables} == {v.variable: v.md5 for v in normal.variables}
    assert fallback.file_bytes and fallback.bytes_fetched >= fallback.file_bytes
    assert not list((tmp_path / "b" / ".scratch").glob("*"))  # the scratch copy is gone


def test_missing_idx_without_full_downloads_writes_nothing(mirror, tmp_path):
    mirror.faults.add("*.idx", "status", code=404, times=None)
    with pytest.raises(HourNotPublished):
        _ingest(mirror, CacheLayout(tmp_path), allow_full_download=False)
    assert _all_files(tmp_path / "gribs") == []


def test_a_broken_message_frame_is_refetched(mirror, tmp_path):
    # every byte of the first GRIB range flipped: no `GRIB` where the .idx says a message starts
    mirror.faults.add("*.grib2", "corrupt", count=1 << 30)
    report, client = _ingest(mirror, CacheLayout(tmp_path))
    assert report.retries == 1
    for v in report.variables:
        grib.verify_messages(open(v.path, "rb").read(), source=v.path, expected=1)


def test_a_broken_section_chain_is_refetched(mirror, tmp_path):
    """Damage to a section header (not the framing) is caught from the headers, without a decode."""
    from weather_pipeline.core import ingest

    calls = []
    real = grib.grib2_sections
    monkey = pytest.MonkeyPatch()

    def sections(message, **kw):
        calls.append(len(message))
        if len(calls) == 1:  # the first message seen: as if its section 5 header were flipped
            raise grib.GribError("found section 9 after section 4 (corrupted section header?)")
        return real(message, **kw)

    monkey.setattr(ingest.grib, "grib2_sections", sections)
    try:
        report, _ = _ingest(mirror, CacheLayout(tmp_path), variables=["t2m"])
    finally:
        monkey.undo()
    assert report.retries == 1 and len(calls) >= 2


def test_damage_inside_a_data_section_is_caught_where_values_are_decoded(mirror, tmp_path, monkeypatch):
    """eccodes decodes flipped data bytes without complaint and ingest does not decode values:
    the tile build, the one decode, checks the plausibility envelope, quarantines the GRIB and
    asks for the hour again; the tile is never built from it."""
    from weather_pipeline.core import tiles
    from weather_pipeline.core.tiles import GribNeedsRefetch, build_hour

    cache = CacheLayout(tmp_path / "checked")
    mirror.faults.add("*.grib2", "corrupt", count=16)  # middle of the one t2m message: its data section
    report, _ = _ingest(mirror, cache, variables=["t2m"])
    assert report.retries == 0  # the headers are intact: nothing for ingest to see
    md5 = {v.variable: v.md5 for v in report.variables}
    with pytest.raises(GribNeedsRefetch, match="outside the plausible") as caught:
        build_hour("hrrr", HRRR_RUN, 1, cache, variables=["t2m"], regions=["kansas"], expected_md5=md5)
    assert caught.value.quarantined and caught.value.quarantined.is_file()
    assert not cache.grib_path("hrrr", HRRR_RUN, "t2m", 1).exists()
    assert not _all_files(tmp_path / "checked" / "tiles")
    # the hour fetched again (the fault was once) tiles cleanly
    report, _ = _ingest(mirror, cache, variables=["t2m"])
    built = build_hour("hrrr", HRRR_RUN, 1, cache, variables=["t2m"], regions=["kansas"],
                       expected_md5={v.variable: v.md5 for v in report.variables})
    assert built.built and 180 < built.results[0].stats["min"] < built.results[0].stats["max"] < 340

    # Without the envelope the same damage would be tiled as if it were data.
    monkeypatch.setattr(tiles, "_check_plausible", lambda *a, **k: None)
    mirror.faults.add("*.grib2", "corrupt", count=16)
    unchecked = CacheLayout(tmp_path / "unchecked")
    _ingest(mirror, unchecked, variables=["t2m"])
    stats = build_hour("hrrr", HRRR_RUN, 1, unchecked, variables=["t2m"], regions=["kansas"]).results[0].stats
    assert not (180 < stats["min"] and stats["max"] < 340)


def test_ingest_does_not_decode_values(mirror, tmp_path, monkeypatch):
    """Decode once: the value decode belongs to the tile build."""
    monkeypatch.setattr(eccodes, "codes_get_values", lambda *a, **k: pytest.fail("ingest decoded values"))
    monkeypatch.setattr(eccodes, "codes_get_array", lambda *a, **k: pytest.fail("ingest decoded values"))
    report, _ = _ingest(mirror, CacheLayout(tmp_path))
    assert len(report.variables) == 6


def test_truncated_range_is_refetched(mirror, tmp_path):
    mirror.faults.add("*.grib2", "truncate")
    report, _ = _ingest(mirror, CacheLayout(tmp_path))
    assert report.retries == 1 and len(report.variables) == 6


def test_persistent_corruption_fails_and_writes_nothing(mirror, tmp_path):
    mirror.faults.add("*.grib2", "corrupt", count=1 << 30, times=None)
    with pytest.raises(TransientError, match="content check failed"):
        _ingest(mirror, CacheLayout(tmp_path))
    assert _all_files(tmp_path / "gribs") == []


def test_ignored_range_fails_and_writes_nothing(mirror, tmp_path):
    mirror.faults.add("*.grib2", "ignore_range", times=None)
    with pytest.raises(RangeIgnored):
        _ingest(mirror, CacheLayout(tmp_path))
    assert _all_files(tmp_path / "gribs") == []


def test_server_errors_with_retry_after_are_survived(mirror, tmp_path):
    mirror.faults.add("*.idx", "status", code=503, retry_after=0)
    mirror.faults.add("*.grib2", "status", code=429, retry_after=0)
    report, _ = _ingest(mirror, CacheLayout(tmp_path))
    assert report.retries == 2 and len(report.variables) == 6


def test_hour_the_source_does_not_have_is_named(mirror, tmp_path):
    with pytest.raises(HourNotPublished, match=r"hrrr run 20260512_00 hour 7 is not published"):
        _ingest(mirror, CacheLayout(tmp_path), hour=7)
    assert not (tmp_path / "gribs").exists()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model": "ecmwf"}, CatalogError, "unknown model 'ecmwf'"),
        ({"run": "2026051200"}, InvalidRequest, "malformed run key '2026051200'"),
        ({"hour": 49}, InvalidRequest, "forecast hour 49 is outside"),
        ({"variables": ["t2m", "nope"]}, CatalogError, "unknown variable 'nope'"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(mirror, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        _ingest(mirror, CacheLayout(tmp_path), **kwargs)
    assert not tmp_path.joinpath("gribs").exists()


def test_old_run_is_not_asked_of_nomads():
    from weather_pipeline.core.sources import candidate_sources

    model = load_catalog().model("hrrr")
    settings = SourceSettings(order=("aws", "nomads"))
    run = datetime(2026, 5, 12, 0, tzinfo=timezone.utc)
    fresh = candidate_sources(model, run, settings, now=run.replace(hour=3))
    assert [c.source for c in fresh] == ["aws", "nomads"]
    old = candidate_sources(model, run, settings, now=datetime(2026, 5, 20, tzinfo=timezone.utc))
    assert [c.source for c in old] == ["aws"]
    with pytest.raises(SourceUnavailable, match="keeps only the last"):
        candidate_sources(model, run, SourceSettings(order=("nomads",)), now=datetime(2026, 5, 20, tzinfo=timezone.utc))
    with pytest.raises(SourceUnavailable, match="archive starts 2014-07-30"):
        candidate_sources(model, datetime(2013, 1, 1, tzinfo=timezone.utc), SourceSettings(order=("aws",)), now=NOW)


def test_a_variable_chosen_by_name_only(mirror, tmp_path):
    report, _ = _ingest(mirror, CacheLayout(tmp_path), variables=["gust"])
    assert [v.variable for v in report.variables] == ["gust"]
    h = eccodes.codes_new_from_message(open(report.variables[0].path, "rb").read())
    try:
        assert eccodes.codes_get(h, "Nx") == 1799
    finally:
        eccodes.codes_release(h)


def test_hours_of_a_batch_are_fetched_concurrently_within_the_per_server_bound(mirror, tmp_path):
    from weather_pipeline.core.ingest import ingest_hours

    serial_cache = CacheLayout(tmp_path / "serial")
    serial = {h: _ingest(mirror, serial_cache, hour=h)[0] for h in (0, 1, 2)}
    mirror.faults.add("*.grib2", "delay", seconds=0.3, times=None)  # every range answers slowly
    mirror.clear_log()
    client = HttpClient(HttpConfig(retry=RetryPolicy(max_attempts=3, initial_wait=0.01, jitter=0.01),
                                   max_connections_per_host=3))
    settings = SourceSettings(order=("mirror",), mirror_url=mirror.url)
    with ingest_hours("hrrr", [(HRRR_RUN, h) for h in (0, 1, 2)], hours_at_once=3, client=client,
                      cache=CacheLayout(tmp_path / "batch"), settings=settings, now=NOW) as batch:
        results = {hour: result for _run, hour, result in batch}
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    assert 2 <= mirror.peak_in_flight <= 3  # concurrent, never more than the bound
    for hour, report in results.items():
        # each hour counts its own requests although three hours shared one client
        assert report.requests == serial[hour].requests == report.grib_requests + 1
        assert report.bytes_fetched == serial[hour].bytes_fetched
        assert {v.variable: v.md5 for v in report.variables} == {v.variable: v.md5 for v in serial[hour].variables}
    assert client.stats.requests == sum(r.requests for r in results.values())


def test_cancel_pending_starts_no_more_hours_but_reports_those_in_flight(mirror, tmp_path):
    from weather_pipeline.core.ingest import ingest_hours

    mirror.faults.add("*.grib2", "delay", seconds=0.2, times=None)
    settings = SourceSettings(order=("mirror",), mirror_url=mirror.url)
    seen = []
    # the mirror has three hours; the same hour asked twice over is fine for this (the hour lock)
    hours = [(HRRR_RUN, h) for h in (0, 1, 2, 0, 1, 2)]
    with ingest_hours("hrrr", hours, hours_at_once=2, client=_client(),
                      cache=CacheLayout(tmp_path), settings=settings, now=NOW) as batch:
        for _run, hour, result in batch:
            seen.append(hour)
            if len(seen) == 1:
                cancelled = batch.cancel_pending()
    # two in flight when the first ended (a third may have started as it finished): every hour
    # is either reported or cancelled, none both, and most were never started
    assert len(seen) + len(cancelled) == 6 and len(seen) <= 3 and len(seen) >= 2


def test_an_interrupt_stops_the_helper_threads_downloads_at_once(mirror, tmp_path):
    """SIGTERM/Ctrl-C reach the main thread only: leaving a batch early aborts the client, so
    threads trickling a body in stop at their next chunk instead of running to the deadline."""
    import time as _time

    from weather_pipeline.core.http import Aborted
    from weather_pipeline.core.ingest import ingest_hours

    mirror.faults.add("*.grib2", "trickle", count=1, seconds=0.5, times=None)  # a byte every 0.5 s
    settings = SourceSettings(order=("mirror",), mirror_url=mirror.url)
    client = _client()
    t0 = _time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with ingest_hours("hrrr", [(HRRR_RUN, h) for h in (0, 1, 2)], hours_at_once=3, client=client,
                          cache=CacheLayout(tmp_path), settings=settings, now=NOW) as batch:
            while mirror.in_flight < 3:  # the ranges are trickling in
                _time.sleep(0.05)
            raise KeyboardInterrupt  # as Dagster's SIGTERM handler does in the main thread
    assert _time.monotonic() - t0 < 20  # not the transfer deadline (60 s + size at 256 KB/s)
    with pytest.raises(Aborted):
        client.get_text(mirror.url + "/anything")
    assert not _all_files(tmp_path / "gribs")
