"""PruneCache: finding runs on disk, planning by retention and budget, removing atomically."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from weather_pipeline.core import prune
from weather_pipeline.core.cache import TEMP_PREFIX, CacheLayout, sidecar_path
from weather_pipeline.core.catalog import format_run_key
from weather_pipeline.core.prune import (
    PruneError,
    RunOnDisk,
    clean_stale_temp_files,
    disk_usage,
    execute_prune,
    plan_prune,
    runs_on_disk,
)

NOW = datetime(2023, 1, 27, 12, tzinfo=timezone.utc)
RETENTION = {"hrrr": 48, "gfs": 120}


def _write(path: Path, size: int, mtime: datetime | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    if mtime is not None:
        os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


def _put_gribs(cache: CacheLayout, model: str, run: str, sizes: dict[str, int]) -> int:
    for i, (var, size) in enumerate(sizes.items()):
        _write(cache.grib_path(model, run, var, i), size)
    return sum(sizes.values())


def _put_tiles(cache: CacheLayout, region: str, res: float, model: str, run: str, size: int) -> int:
    """One hourly tile and one run tile, each with a 10-byte sidecar: size*2 + 20 bytes."""
    tile = _write(cache.tile_path(region, res, model, run, "t2m", 0), size)
    _write(sidecar_path(tile), 10)
    run_tile = _write(cache.run_tile_path(region, res, model, run, "t2m"), size)
    _write(sidecar_path(run_tile), 10)
    return size * 2 + 20


def _run(model: str, hours_old: float, nbytes: int) -> RunOnDisk:
    """A synthetic run for the planner, `hours_old` before NOW (rounded to the hour)."""
    run_time = NOW - timedelta(hours=hours_old)
    return RunOnDisk(model, format_run_key(run_time), run_time, nbytes, [], None, None)


def _keys(items) -> list[tuple[str, str]]:
    return [(r.model, r.run) for r, _ in items]


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> md5 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _file_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# -- runs on disk ------------------------------------------------------------------------------


def test_runs_on_disk_finds_runs_under_gribs_and_tiles_and_sums_bytes(tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    a = _put_gribs(cache, "hrrr", "20230125_12", {"t2m": 100, "apcp": 50})
    a_tiles = _put_tiles(cache, "conus", 0.25, "hrrr", "20230125_12", 30)
    a_tiles += _put_tiles(cache, "kansas", 0.05, "hrrr", "20230125_12", 7)
    b = _put_gribs(cache, "hrrr", "20230126_00", {"t2m": 200})  # gribs only
    c = _put_tiles(cache, "conus", 1.0, "gfs", "20230125_06", 40)  # tiles only
    old = datetime(2023, 1, 25, 13, tzinfo=timezone.utc)
    new = datetime(2023, 1, 25, 15, tzinfo=timezone.utc)
    for p in cache.root.rglob("*"):
        if p.is_file() and "20230125_12" in p.parts:
            os.utime(p, ((old + timedelta(hours=1)).timestamp(),) * 2)
    os.utime(cache.grib_path("hrrr", "20230125_12", "t2m", 0), (old.timestamp(),) * 2)
    os.utime(cache.run_tile_path("kansas", 0.05, "hrrr", "20230125_12", "t2m"), (new.timestamp(),) * 2)

    runs = runs_on_disk(cache)

    assert [(r.model, r.run) for r in runs] == [("gfs", "20230125_06"), ("hrrr", "20230125_12"), ("hrrr", "20230126_00")]
    gfs, hrrr_a, hrrr_b = runs
    assert hrrr_a.bytes == a + a_tiles and hrrr_a.grib_bytes == a
    assert hrrr_b.bytes == b == hrrr_b.grib_bytes
    assert gfs.bytes == c and gfs.grib_bytes == 0
    assert hrrr_a.run_time == datetime(2023, 1, 25, 12, tzinfo=timezone.utc)
    assert set(hrrr_a.paths) == {
        cache.grib_run_dir("hrrr", "20230125_12"),
        cache.tile_run_dir("conus", 0.25, "hrrr", "20230125_12"),
        cache.tile_run_dir("kansas", 0.05, "hrrr", "20230125_12"),
    }
    assert gfs.paths == [cache.tile_run_dir("conus", 1.0, "gfs", "20230125_06")]
    assert (hrrr_a.oldest, hrrr_a.newest) == (old, new)


def test_runs_on_disk_ignores_invalid_and_temporary_names(tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    good = _put_gribs(cache, "hrrr", "20230125_12", {"t2m": 10})
    _write(cache.gribs_root / "hrrr" / "notarun" / "t2m" / "grib_000.grib2", 11)
    _write(cache.gribs_root / "hrrr" / "20231345_12" / "t2m" / "grib_000.grib2", 12)  # month 13
    _write(cache.gribs_root / "hrrr" / f"{TEMP_PREFIX}20230125_13" / "x", 13)
    _write(cache.gribs_root / f"{TEMP_PREFIX}hrrr" / "20230125_12" / "x", 14)
    _write(cache.gribs_root / "hrrr" / "stray.grib2", 15)
    _write(cache.tiles_root / "conus" / "quarterdeg" / "hrrr" / "20230125_12" / "t2m.npz", 16)
    _write(cache.tiles_root / "conus" / "0.25deg" / "hrrr" / "2023012512" / "t2m.npz", 17)
    _write(cache.weights_dir / "w.npz", 18)
    _write(cache.deep_status_path, 19)

    runs = runs_on_disk(cache)

    assert [(r.model, r.run, r.bytes) for r in runs] == [("hrrr", "20230125_12", good)]
    usage = disk_usage(cache, runs)
    assert usage["by_run"] == {"hrrr": {"20230125_12": good}}
    assert usage["grib_bytes_by_run"] == {"hrrr": {"20230125_12": good}}
    # What no run owns is reported apart, not lost.
    assert usage["other_bytes"] == {"gribs": 11 + 12 + 13 + 14 + 15, "tiles": 16 + 17, "weights": 18, "status": 19}
    assert usage["total_bytes"] == _file_bytes(cache.root) == good + sum(range(11, 20))


def test_disk_usage_counts_runs_by_model_and_run_and_the_rest_apart(tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    a = _put_gribs(cache, "hrrr", "20230125_12", {"t2m": 100}) + _put_tiles(cache, "conus", 0.25, "hrrr", "20230125_12", 5)
    b = _put_tiles(cache, "conus", 0.25, "gfs", "20230125_06", 9)
    _write(cache.weights_dir / "w.npz", 1000)
    _write(cache.source_availability_path("hrrr"), 20)
    cache.scratch_file(".grib2").write_bytes(b"x" * 7)

    usage = disk_usage(cache)

    assert usage["by_run"] == {"hrrr": {"20230125_12": a}, "gfs": {"20230125_06": b}}
    assert usage["grib_bytes_by_run"] == {"hrrr": {"20230125_12": 100}, "gfs": {"20230125_06": 0}}
    assert usage["run_bytes"] == a + b
    assert usage["other_bytes"] == {".scratch": 7, "gribs": 0, "status": 20, "tiles": 0, "weights": 1000}
    assert usage["total_bytes"] == _file_bytes(cache.root) == a + b + 1027
    assert usage["cache_oldest"] is not None and usage["cache_oldest"] <= usage["cache_newest"]


# -- planning --------------------------------------------------------------------------------------


def test_retention_removes_runs_older_than_their_models_limit_only():
    runs = [
        _run("hrrr", 100, 10),
        _run("hrrr", 49, 10),
        _run("hrrr", 48, 10),  # exactly at the limit: stays
        _run("hrrr", 1, 10),
        _run("gfs", 100, 10),  # gfs keeps 120 h
        _run("gfs", 121, 10),
    ]
    plan = plan_prune(runs, now=NOW, retention_hours=RETENTION, budget_bytes=None, busy=set())

    assert _keys(plan.remove) == [_run("gfs", 121, 0).key, _run("hrrr", 100, 0).key, _run("hrrr", 49, 0).key]
    assert all("48 h retention" in why for r, why in plan.remove if r.model == "hrrr")
    assert "120 h retention" in plan.remove[0][1]
    assert plan.protected == [] and plan.warnings == []
    assert (plan.total_bytes, plan.bytes_to_free, plan.bytes_after) == (60, 30, 30)


def test_budget_removes_oldest_first_across_models_and_stops_once_under_budget():
    runs = [
        _run("hrrr", 3, 100),
        _run("gfs", 6, 100),
        _run("hrrr", 2, 100),
        _run("hrrr", 5, 100),
        _run("gfs", 0, 100),
        _run("hrrr", 4, 100),
    ]
    plan = plan_prune(runs, now=NOW, retention_hours=RETENTION, budget_bytes=350, busy=set())

    # 600 bytes, budget 350: the three oldest go (gfs -6 h, hrrr -5 h, hrrr -4 h), not a fourth.
    assert _keys(plan.remove) == [_run("gfs", 6, 0).key, _run("hrrr", 5, 0).key, _run("hrrr", 4, 0).key]
    assert all(why == "disk budget 350 B exceeded: oldest first" for _, why in plan.remove)
    assert plan.bytes_to_free == 300 and plan.bytes_after == 300 <= plan.budget_bytes
    assert plan.warnings == []

    fits = plan_prune(runs, now=NOW, retention_hours=RETENTION, budget_bytes=600, busy=set())
    assert fits.remove == [] and fits.warnings == []


def test_budget_counts_only_what_retention_leaves():
    runs = [_run("hrrr", 60, 500), _run("hrrr", 2, 100), _run("hrrr", 1, 100)]
    plan = plan_prune(runs, now=NOW, retention_hours=RETENTION, budget_bytes=250, busy=set())
    assert _keys(plan.remove) == [runs[0].key]  # retention alone brings 700 down to 200
    assert "retention" in plan.remove[0][1]


def test_busy_runs_are_protected_from_retention_and_from_the_budget():
    old_busy = _run("hrrr", 60, 100)
    old_idle = _run("hrrr", 59, 100)
    budget_busy = _run("gfs", 10, 100)
    budget_idle = _run("gfs", 9, 100)
    newest = [_run("gfs", 1, 100), _run("hrrr", 1, 100)]
    busy = {old_busy.key, budget_busy.key}

    plan = plan_prune(
        [old_busy, old_idle, budget_busy, budget_idle, *newest],
        now=NOW, retention_hours=RETENTION, budget_bytes=250, busy=busy,
    )

    assert _keys(plan.remove) == [old_idle.key, budget_idle.key]
    protected = dict(((r.model, r.run), why) for r, why in plan.protected)
    assert set(protected) == busy
    assert "retention" in protected[old_busy.key] and "in progress" in protected[old_busy.key]
    assert "disk budget" in protected[budget_busy.key] and "in progress" in protected[budget_busy.key]
    # Busy runs still take disk: 400 bytes remain against a 250-byte budget, and the plan says so.
    assert plan.bytes_after == 400
    assert any("exceeded after pruning" in w for w in plan.warnings)


def test_budget_alone_never_removes_the_newest_run_of_a_model():
    hrrr_old, hrrr_new = _run("hrrr", 30, 300), _run("hrrr", 20, 300)
    gfs_old, gfs_new = _run("gfs", 24, 300), _run("gfs", 0, 300)
    plan = plan_prune(
        [hrrr_old, hrrr_new, gfs_old, gfs_new], now=NOW, retention_hours=RETENTION, budget_bytes=100, busy=set()
    )

    # hrrr's newest run is older than gfs's older one, yet stays: one run per model is kept.
    assert _keys(plan.remove) == [hrrr_old.key, gfs_old.key]
    assert any(hrrr_new.run in w and "newest" in w for w in plan.warnings)
    assert any(gfs_new.run in w and "newest" in w for w in plan.warnings)
    assert any("exceeded after pruning" in w for w in plan.warnings)

    # Retention, though, removes a model's newest run like any other.
    expired = plan_prune([_run("hrrr", 50, 10)], now=NOW, retention_hours=RETENTION, budget_bytes=None, busy=set())
    assert len(expired.remove) == 1 and any("no hrrr run will be left" in w for w in expired.warnings)


def test_budget_keeps_the_newest_settled_run_when_the_newest_is_still_being_fetched():
    settled, in_progress = _run("hrrr", 2, 300), _run("hrrr", 1, 300)
    older = _run("hrrr", 3, 300)
    plan = plan_prune(
        [older, settled, in_progress], now=NOW, retention_hours=RETENTION, budget_bytes=100, busy={in_progress.key}
    )
    assert _keys(plan.remove) == [older.key]
    assert _keys(plan.protected) == [in_progress.key]
    assert any(settled.run in w for w in plan.warnings)


def test_models_without_retention_are_kept_with_a_warning():
    plan = plan_prune([_run("nam", 1000, 10)], now=NOW, retention_hours=RETENTION, budget_bytes=None, busy=set())
    assert plan.remove == [] and any("'nam'" in w for w in plan.warnings)


def test_plan_as_dict_is_plain_data():
    r = _run("hrrr", 60, 42)
    d = plan_prune([r], now=NOW, retention_hours=RETENTION, budget_bytes=10**10, busy=set()).as_dict()
    assert d["remove"] == [{"model": "hrrr", "run": r.run, "bytes": 42, "reason": "older than 48 h retention (run is 60.0 h old)"}]
    assert (d["total_bytes"], d["bytes_to_free"], d["budget_bytes"], d["protected"]) == (42, 42, 10**10, [])


# -- executing -------------------------------------------------------------------------------------


def _two_model_cache(tmp_path) -> CacheLayout:
    cache = CacheLayout(tmp_path / "cache")
    for model, run in [("hrrr", "20230125_00"), ("hrrr", "20230127_00"), ("gfs", "20230125_00")]:
        _put_gribs(cache, model, run, {"t2m": 100, "apcp": 30})
        _put_tiles(cache, "conus", 0.25, model, run, 40)
    _put_tiles(cache, "kansas", 0.05, "hrrr", "20230125_00", 5)  # only the old hrrr run has kansas
    _write(cache.weights_dir / "w.npz", 500)
    _write(cache.deep_status_path, 50)
    return cache


def test_execute_removes_exactly_the_planned_runs_and_frees_the_reported_bytes(tmp_path):
    cache = _two_model_cache(tmp_path)
    runs = runs_on_disk(cache)
    plan = plan_prune(runs, now=NOW, retention_hours={"hrrr": 48, "gfs": 48}, budget_bytes=None, busy=set())
    assert sorted(_keys(plan.remove)) == [("gfs", "20230125_00"), ("hrrr", "20230125_00")]
    before = {k: v for k, v in _snapshot(cache.root).items() if "20230125_00" not in k}
    bytes_before = _file_bytes(cache.root)

    result = execute_prune(cache, plan)

    assert result.errors == [] and result.skipped == []
    assert sorted((r.model, r.run) for r in result.removed) == sorted(_keys(plan.remove))
    assert result.bytes_freed == plan.bytes_to_free == bytes_before - _file_bytes(cache.root)
    assert {(r.model, r.run): r.bytes_freed for r in result.removed} == {(r.model, r.run): r.bytes for r, _ in plan.remove}
    assert _snapshot(cache.root) == before  # the other runs, weights and status, byte for byte
    assert [(r.model, r.run) for r in runs_on_disk(cache)] == [("hrrr", "20230127_00")]
    # Model (and region / res) directories left empty are gone; gribs/ and tiles/ stay.
    assert not (cache.gribs_root / "gfs").exists()
    assert not (cache.tiles_root / "conus" / "0.25deg" / "gfs").exists()
    assert not (cache.tiles_root / "kansas").exists()
    assert (cache.gribs_root / "hrrr").is_dir() and (cache.tiles_root / "conus" / "0.25deg" / "hrrr").is_dir()

    # Removing the last run too leaves the empty gribs/ and tiles/ (and the root) in place.
    last = plan_prune(runs_on_disk(cache), now=NOW + timedelta(days=10), retention_hours=RETENTION, budget_bytes=None, busy=set())
    assert execute_prune(cache, last).errors == []
    assert cache.gribs_root.is_dir() and cache.tiles_root.is_dir()
    assert list(cache.gribs_root.iterdir()) == [] and list(cache.tiles_root.iterdir()) == []
    assert _snapshot(cache.root) == {"weights/w.npz": before["weights/w.npz"], "status/deep.json": before["status/deep.json"]}


def test_a_reader_never_sees_a_half_deleted_run(tmp_path, monkeypatch):
    cache = _two_model_cache(tmp_path)
    plan = plan_prune(runs_on_disk(cache), now=NOW, retention_hours={"hrrr": 48, "gfs": 48}, budget_bytes=None, busy=set())
    doomed = {r.key: r for r, _ in plan.remove}

    # What a reader would find at the moment the first file of each run is deleted.
    seen: dict[tuple[str, str], list[Path]] = {}
    real_delete = prune._delete_tree

    def observing_delete(path, freed):
        name = path.name  # .tmp-prune-{model}-{run}-{id}
        for key, run in doomed.items():
            if f"-{key[0]}-{key[1]}-" in name and key not in seen:
                seen[key] = [p for p in run.paths if p.exists()]
        real_delete(path, freed)

    monkeypatch.setattr(prune, "_delete_tree", observing_delete)
    result = execute_prune(cache, plan)

    assert result.errors == []
    assert seen == {key: [] for key in doomed}  # every directory of the run was gone before any deletion
    for run in doomed.values():
        assert not any(p.exists() for p in run.paths)
    # No partial directory anywhere: nothing left in scratch, no temporary names in the cache.
    assert list(cache.scratch_dir.iterdir()) == []
    assert not [p for p in cache.root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_a_run_that_cannot_be_moved_aside_whole_is_put_back(tmp_path, monkeypatch):
    cache = _two_model_cache(tmp_path)
    plan = plan_prune(runs_on_disk(cache), now=NOW, retention_hours={"hrrr": 48}, budget_bytes=None, busy=set())
    (run, _), = plan.remove
    assert len(run.paths) == 3
    before = _snapshot(cache.root)
    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(18, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(prune.os, "rename", failing_rename)
    result = execute_prune(cache, plan)

    assert result.removed == [] and result.bytes_freed == 0
    assert any("could not move" in e for e in result.errors)
    assert _snapshot(cache.root) == before  # the first directory was renamed back
    assert all(p.is_dir() for p in run.paths)


def test_execute_skips_runs_that_became_busy_since_planning(tmp_path):
    cache = _two_model_cache(tmp_path)
    plan = plan_prune(runs_on_disk(cache), now=NOW, retention_hours={"hrrr": 48, "gfs": 48}, budget_bytes=None, busy=set())
    result = execute_prune(cache, plan, is_busy=lambda model, run: model == "gfs")
    assert [(r.model, r.run) for r in result.removed] == [("hrrr", "20230125_00")]
    assert [(r.model, r.run) for r, _ in result.skipped] == [("gfs", "20230125_00")]
    assert cache.grib_run_dir("gfs", "20230125_00").is_dir()


@pytest.mark.parametrize(
    "bad_path",
    [
        lambda tmp, cache: tmp / "elsewhere" / "20230125_00",  # outside the root
        lambda tmp, cache: cache.gribs_root / "hrrr",  # a whole model
        lambda tmp, cache: cache.weights_dir,
        lambda tmp, cache: cache.grib_run_dir("hrrr", "20230127_00"),  # another run's directory
    ],
)
def test_execute_refuses_paths_that_are_not_the_runs_own_directories(tmp_path, bad_path):
    cache = _two_model_cache(tmp_path)
    (tmp_path / "elsewhere" / "20230125_00").mkdir(parents=True)
    (tmp_path / "elsewhere" / "20230125_00" / "precious").write_text("x")
    before = _snapshot(tmp_path)
    run = RunOnDisk("hrrr", "20230125_00", NOW, 1, [cache.grib_run_dir("hrrr", "20230125_00"), bad_path(tmp_path, cache)], None, None)
    plan = prune.PrunePlan(remove=[(run, "test")])

    with pytest.raises(PruneError, match="refusing to prune"):
        execute_prune(cache, plan)
    assert _snapshot(tmp_path) == before  # not even the valid path was touched


# -- stale temporary files -----------------------------------------------------------------------


def test_stale_temp_files_are_removed_and_fresh_ones_kept(tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    now = datetime.now(timezone.utc)
    old = now - timedelta(hours=2)
    fresh = now - timedelta(minutes=5)
    run_dir = cache.grib_run_dir("hrrr", "20230125_12")
    stale_file = _write(run_dir / "t2m" / f"{TEMP_PREFIX}grib_000.grib2.abc", 10, old)
    fresh_file = _write(run_dir / "t2m" / f"{TEMP_PREFIX}grib_001.grib2.def", 10, fresh)
    real_file = _write(run_dir / "t2m" / "grib_000.grib2", 10, old)  # old, but not temporary
    stale_weights = _write(cache.weights_dir / f"{TEMP_PREFIX}lambert.npz.x", 10, old)
    # A prune's leftover in scratch: a directory, old through and through.
    stale_dir = cache.scratch_dir / f"{TEMP_PREFIX}prune-hrrr-20230101_00-123"
    _write(stale_dir / "t2m" / "grib_000.grib2", 10, old)
    os.utime(stale_dir / "t2m", (old.timestamp(),) * 2)
    os.utime(stale_dir, (old.timestamp(),) * 2)
    # A temporary directory whose own mtime is old but that is still being written into.
    live_dir = cache.scratch_dir / f"{TEMP_PREFIX}live"
    _write(live_dir / "part", 10, fresh)
    os.utime(live_dir, (old.timestamp(),) * 2)
    stale_scratch = _write(cache.scratch_dir / f"{TEMP_PREFIX}dl.grib2", 10, old)

    removed = clean_stale_temp_files(cache, older_than_s=3600, now=now)

    assert removed == sorted([stale_file, stale_weights, stale_dir, stale_scratch])
    assert not any(p.exists() for p in removed)
    assert fresh_file.exists() and real_file.exists() and (live_dir / "part").exists()
    assert cache.scratch_dir.is_dir()  # the scratch directory itself is not a temporary name

    # With a shorter threshold the fresh ones go too.
    later = clean_stale_temp_files(cache, older_than_s=60, now=now)
    assert later == sorted([fresh_file, live_dir])


def test_stale_temp_cleanup_does_not_follow_links_out_of_the_cache(tmp_path):
    cache = CacheLayout(tmp_path / "cache")
    outside = tmp_path / "outside"
    victim = _write(outside / f"{TEMP_PREFIX}victim", 10, datetime(2000, 1, 1, tzinfo=timezone.utc))
    cache.weights_dir.mkdir(parents=True)
    (cache.weights_dir / "link").symlink_to(outside, target_is_directory=True)
    assert clean_stale_temp_files(cache, older_than_s=60) == []
    assert victim.exists()
