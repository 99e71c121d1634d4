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


def test_corrupted_range_is_caught_by_verification_and_refetched(mirror, tmp_path):
    mirror.faults.add("*.grib2", "corrupt", count=64)
    report, client = _ingest(mirror, CacheLayout(tmp_path))
    assert report.retries == 1
    for v in report.variables:
        grib.verify_messages(open(v.path, "rb").read(), source=v.path, expected=1)


def test_damage_inside_a_data_section_is_caught_by_the_value_envelope(mirror, tmp_path, monkeypatch):
    """eccodes decodes flipped data bytes without complaint; the plausibility envelope does not."""
    from weather_pipeline.core import ingest

    mirror.faults.add("*.grib2", "corrupt", count=16)  # middle of the one t2m message: its data section
    report, _ = _ingest(mirror, CacheLayout(tmp_path / "checked"), variables=["t2m"])
    assert report.retries == 1
    values = grib.read_field(report.variables[0].path).values
    assert 180 < float(values.min()) and float(values.max()) < 340

    # Without the envelope the same damage would be written to the cache as if it were data.
    monkeypatch.setattr(ingest, "plausible_envelope", lambda var: None)
    mirror.faults.add("*.grib2", "corrupt", count=16)
    report, _ = _ingest(mirror, CacheLayout(tmp_path / "unchecked"), variables=["t2m"])
    assert report.retries == 0
    values = grib.read_field(report.variables[0].path).values
    assert not (180 < float(values.min()) and float(values.max()) < 340)


def test_truncated_range_is_refetched(mirror, tmp_path):
    mirror.faults.add("*.grib2", "truncate")
    report, _ = _ingest(mirror, CacheLayout(tmp_path))
    assert report.retries == 1 and len(report.variables) == 6


def test_persistent_corruption_fails_and_writes_nothing(mirror, tmp_path):
    mirror.faults.add("*.grib2", "corrupt", times=None)
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
