"""IngestGrib against tampered, dead and inconsistent sources: refused, named, nothing written."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from weather_pipeline.core import grib
from weather_pipeline.core.cache import CacheLayout, md5_file
from weather_pipeline.core.catalog import build_catalog, load_catalog
from weather_pipeline.core.http import HttpClient, HttpConfig, RetryPolicy, reset_server_states
from weather_pipeline.core.idx import IdxError
from weather_pipeline.core.ingest import (
    HourNotPublished,
    MessageMismatch,
    SourceAsksToWait,
    SourceInconsistent,
    SourceUnreachable,
    check_identity,
    ingest_hour,
    is_transient,
)
from weather_pipeline.core.sources import SourceSettings
from weather_pipeline.mirror.generate import mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer
from weather_pipeline_tests.mirror_fixtures import GFS_RUN, HRRR_RUN

from .test_ingest import NOW


@pytest.fixture(autouse=True)
def fresh_breakers():
    reset_server_states()
    yield
    reset_server_states()


def _client(**config) -> HttpClient:
    return HttpClient(HttpConfig(retry=RetryPolicy(max_attempts=3, initial_wait=0.01, jitter=0.01), **config))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _gribs(cache: CacheLayout) -> list[Path]:
    return _files(cache.gribs_root)


@pytest.fixture()
def tampered(mirror_root, tmp_path):
    """A hard-linked copy of the shared mirror to tamper with (replace files, never edit them)."""
    root = tmp_path / "tampered"
    for src in mirror_root.rglob("*"):
        if src.is_file():
            dest = root / src.relative_to(mirror_root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dest)
    return root


def _path(root: Path, model: str, run: str, hour: int) -> Path:
    return root / mirror_relative_path(model, run, hour)


def _replace(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text)


def _ingest(server, cache, model="hrrr", run=HRRR_RUN, hour=1, **kw):
    settings = SourceSettings(order=("mirror",), mirror_url=server.url)
    return ingest_hour(model, run, hour, cache=cache, client=kw.pop("client", None) or _client(),
                       settings=settings, now=NOW, **kw)


def _swap_lines(idx: str, a: str, b: str) -> str:
    """Swap the VAR:LEVEL parts of the two lines matching `a` and `b` (offsets stay)."""
    lines = idx.splitlines()
    ia = next(i for i, line in enumerate(lines) if a in line)
    ib = next(i for i, line in enumerate(lines) if b in line)

    def head_tail(line: str) -> tuple[str, str]:
        parts = line.split(":")
        return ":".join(parts[:3]), ":".join(parts[3:])

    ha, ta = head_tail(lines[ia])
    hb, tb = head_tail(lines[ib])
    lines[ia], lines[ib] = f"{ha}:{tb}", f"{hb}:{ta}"
    return "\n".join(lines) + "\n"


def test_swapped_idx_lines_are_refused_and_nothing_is_written(tampered, tmp_path):
    idx = _path(tampered, "hrrr", HRRR_RUN, 1).with_name(_path(tampered, "hrrr", HRRR_RUN, 1).name + ".idx")
    _replace(idx, _swap_lines(idx.read_text(), ":TMP:2 m above ground:", ":UGRD:10 m above ground:"))
    cache = CacheLayout(tmp_path / "cache")
    with MirrorServer(tampered) as server, pytest.raises(MessageMismatch) as info:
        _ingest(server, cache)
    text = str(info.value)
    # names the file, the variable, and both identities
    assert "hrrr.t00z.wrfsfcf01.grib2 bytes" in text
    assert "the .idx says message" in text and "is TMP:2 m above ground:1 hour fcst" in text
    assert "the message itself is UGRD:10 m above ground:1 hour fcst" in text and "not hrrr t2m" in text
    assert "Nothing was written for hrrr 20260512_00 f001" in text
    assert _gribs(cache) == [] and not is_transient(info.value)


def test_another_hours_file_at_this_hours_url_is_refused(tampered, tmp_path):
    three = _path(tampered, "hrrr", HRRR_RUN, 1)  # hour 1's file, served as hour 2
    two = _path(tampered, "hrrr", HRRR_RUN, 2)
    for suffix in ("", ".idx"):
        target = two.with_name(two.name + suffix)
        target.unlink()
        os.link(three.with_name(three.name + suffix), target)
    cache = CacheLayout(tmp_path / "cache")
    with MirrorServer(tampered) as server, pytest.raises(MessageMismatch, match="forecast time is hour 1, not hour 2"):
        _ingest(server, cache, hour=2)
    assert _gribs(cache) == []


def test_another_runs_file_is_refused(tampered, tmp_path):
    # The GFS run's f001 served as a different (later) run of the same model.
    src = _path(tampered, "gfs", GFS_RUN, 1)
    other_run = "20260512_12"
    dest = _path(tampered, "gfs", other_run, 1)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".idx"):
        os.link(src.with_name(src.name + suffix), dest.with_name(dest.name + suffix))
    cache = CacheLayout(tmp_path / "cache")
    with MirrorServer(tampered) as server, pytest.raises(MessageMismatch, match="reference time is 2026-05-12 06:00Z, not the run 2026-05-12 12:00Z"):
        _ingest(server, cache, model="gfs", run=other_run, hour=1)
    assert _gribs(cache) == []


def test_the_wrong_accumulation_is_refused(tampered, tmp_path):
    """HRRR f02 has a 0-2 h (run total) and a 1-2 h APCP; an .idx naming them the other way round."""
    idx = _path(tampered, "hrrr", HRRR_RUN, 2)
    idx = idx.with_name(idx.name + ".idx")
    text = idx.read_text()
    assert ":APCP:surface:0-2 hour acc fcst:" in text and ":APCP:surface:1-2 hour acc fcst:" in text
    text = (text.replace(":APCP:surface:0-2 hour acc fcst:", ":APCP:surface:@@:")
                .replace(":APCP:surface:1-2 hour acc fcst:", ":APCP:surface:0-2 hour acc fcst:")
                .replace(":APCP:surface:@@:", ":APCP:surface:1-2 hour acc fcst:"))
    _replace(idx, text)
    cache = CacheLayout(tmp_path / "cache")
    with MirrorServer(tampered) as server, pytest.raises(MessageMismatch, match="1-2 hour acc fcst"):
        _ingest(server, cache, hour=2, variables=["apcp"])
    assert _gribs(cache) == []


def test_a_locally_built_index_is_checked_too(tampered, tmp_path):
    """No .idx, and the GRIB at hour 2's name is hour 1's: the full download is refused as well."""
    one, two = _path(tampered, "hrrr", HRRR_RUN, 1), _path(tampered, "hrrr", HRRR_RUN, 2)
    two.unlink()
    os.link(one, two)
    two.with_name(two.name + ".idx").unlink()
    cache = CacheLayout(tmp_path / "cache")
    with MirrorServer(tampered) as server, pytest.raises(MessageMismatch, match="local index says"):
        _ingest(server, cache, hour=2)
    assert _gribs(cache) == [] and not list(cache.scratch_dir.glob("*"))


def test_identity_check_on_the_real_hrrr_accumulations(real_dir):
    """Both real APCP messages of HRRR f12: only the 0-12 h one is the catalog's run total."""
    data = (real_dir / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2").read_bytes()
    total, bucket = grib.message_identities(data)
    apcp = load_catalog().model("hrrr").variable("apcp")
    run = total.reference_time
    assert check_identity(apcp, total, run, 12) == []
    assert any("0-12" in p or "match" in p for p in check_identity(apcp, bucket, run, 12))
    assert "forecast time is hour 12, not hour 11" in " ".join(check_identity(apcp, total, run, 11))
    t2m = load_catalog().model("hrrr").variable("t2m")
    assert "do not match ':TMP:2 m above ground:'" in " ".join(check_identity(t2m, total, run, 12))


def test_a_grib_missing_beside_its_idx_is_inconsistent_not_unpublished(mirror, tmp_path):
    mirror.faults.add("*wrfsfcf01.grib2", "status", code=404, times=None)
    cache = CacheLayout(tmp_path)
    with pytest.raises(SourceInconsistent, match="the .idx is there but the GRIB is not"):
        _ingest(mirror, cache)
    assert _gribs(cache) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _catalog_with_dead_source(dead_url: str):
    raw = dict(load_catalog().raw)
    raw["sources"] = {**raw["sources"], "dead": {"title": "a source that refuses connections", "listing": "s3"}}
    models = {}
    for name, m in raw["models"].items():
        urls = {**m["urls"], "dead": f"{dead_url}/{m['urls']['aws'].split('//')[1].split('.')[0]}"}
        models[name] = {**m, "urls": urls}
    raw["models"] = models
    return build_catalog(raw)


def test_an_unreachable_source_fails_over_to_the_next(mirror, tmp_path):
    catalog = _catalog_with_dead_source(f"http://127.0.0.1:{_free_port()}")
    settings = SourceSettings(order=("dead", "mirror"), mirror_url=mirror.url)
    report = ingest_hour("hrrr", HRRR_RUN, 1, cache=CacheLayout(tmp_path), client=_client(), settings=settings,
                         now=NOW, catalog=catalog)
    assert report.source == "mirror" and "connection refused" in report.sources_failed["dead"]


def test_no_reachable_source_is_unreachable_not_unpublished_and_fast(tmp_path):
    catalog = _catalog_with_dead_source(f"http://127.0.0.1:{_free_port()}")
    settings = SourceSettings(order=("dead",))
    client = _client()
    t0 = time.monotonic()
    for hour in (0, 1, 2, 3):
        with pytest.raises(SourceUnreachable, match="unreachable") as info:
            ingest_hour("hrrr", HRRR_RUN, hour, cache=CacheLayout(tmp_path), client=client, settings=settings,
                        now=NOW, catalog=catalog)
        assert not isinstance(info.value, HourNotPublished) and is_transient(info.value)
    assert time.monotonic() - t0 < 10
    assert client.stats.requests == 3  # the breaker opened after 3 refusals; later hours cost nothing


def test_a_long_retry_after_fails_the_hour_with_the_time_to_wait(mirror, tmp_path):
    mirror.faults.add("*.idx", "status", code=503, retry_after=7200)
    with pytest.raises(SourceAsksToWait, match="asks to wait until") as info:
        _ingest(mirror, CacheLayout(tmp_path))
    assert not is_transient(info.value) and info.value.until.timestamp() > time.time() + 7000


def test_an_enormous_idx_range_is_refused_before_any_message_is_fetched(tampered, tmp_path):
    idx = _path(tampered, "hrrr", HRRR_RUN, 1)
    idx = idx.with_name(idx.name + ".idx")
    lines = idx.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if ":TMP:2 m above ground:" in line)
    nxt = lines[i + 1].split(":")
    nxt[1] = str(int(nxt[1]) + (1 << 30))  # the message "ends" a GB later
    lines[i + 1:] = [":".join(nxt)]
    _replace(idx, "\n".join(lines) + "\n")
    with MirrorServer(tampered) as server:
        with pytest.raises(IdxError, match="over the .* byte limit per message"):
            _ingest(server, CacheLayout(tmp_path / "c"), variables=["t2m"])
        assert all(r.path.endswith(".idx") for r in server.request_log)


@pytest.mark.parametrize("line, message", [
    ("1:-5:d=2026051200:TMP:2 m above ground:1 hour fcst:", "not a wgrib2 inventory line"),
    ("1:500:d=2026051200:REFC:entire atmosphere:1 hour fcst:\n2:100:d=2026051200:TMP:2 m above ground:1 hour fcst:",
     "starts at 100, before the previous message"),
])
def test_negative_and_reversed_idx_offsets_are_refused(tampered, tmp_path, line, message):
    idx = _path(tampered, "hrrr", HRRR_RUN, 1)
    _replace(idx.with_name(idx.name + ".idx"), line + "\n")
    with MirrorServer(tampered) as server, pytest.raises(IdxError, match=message):
        _ingest(server, CacheLayout(tmp_path / "c"), variables=["t2m"])


def test_two_writers_of_one_hour_never_interleave(mirror, tmp_path):
    """The second waits for the first and then reuses what it wrote, fetching nothing."""
    cache = CacheLayout(tmp_path)
    mirror.faults.add("*wrfsfcf01.grib2", "delay", seconds=0.5, times=None)
    reports, errors = [], []

    def run():
        try:
            reports.append(_ingest(mirror, cache))
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(reports) == 2
    first, second = reports
    assert second.source == "cache" and second.requests == 0
    assert {v.variable: v.md5 for v in first.variables} == {v.variable: v.md5 for v in second.variables}
    for v in first.variables:
        assert md5_file(Path(v.path)) == v.md5
    assert not [p for p in _files(cache.root) if p.name.startswith(".tmp-")]
