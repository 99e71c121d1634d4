"""PruneCache: keep the cache within each model's retention and within a disk budget.

Three steps, so the Dagster job can log, check and show each one:

1. `runs_on_disk(cache)` measures every (model, run) in the cache: its GRIB run directory and
   every tile run directory (hourly tiles and run tiles live inside it) under every region and
   resolution.
2. `plan_prune(runs, ...)` decides, without touching the disk, which runs go and why: first
   every run older than its model's retention, then, while what remains exceeds the budget,
   the oldest runs across models. A run with work queued or in progress is never removed, and
   the budget alone never removes the newest run of a model (see `plan_prune`).
3. `execute_prune(cache, plan)` removes them. Each directory of a run is first renamed into
   the cache's scratch directory (same file system, so the rename is atomic) and only then
   deleted, so a reader sees a run's directory whole or not at all, never half-deleted.

`clean_stale_temp_files` removes what crashed writers (and interrupted prunes) left behind,
and `disk_usage` is the per-model, per-run byte count that deep status reports.

Sizes are apparent file sizes (`st_size`), the same numbers the budget is written in, not
allocated blocks. Symbolic links are never followed: a link counts as itself and is removed as
itself, so nothing outside the cache root is ever measured or deleted.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from weather_pipeline.core.cache import TEMP_PREFIX, CacheLayout
from weather_pipeline.core.catalog import InvalidRequest, parse_run_key

log = logging.getLogger(__name__)

RunKey = tuple[str, str]  # (model, run)


class PruneError(ValueError):
    """A plan that would touch something outside the cache's run directories; nothing was done."""


# -- what is on disk -----------------------------------------------------------------------


@dataclass
class RunOnDisk:
    """One model run as it sits in the cache."""

    model: str
    run: str  # YYYYMMDD_HH
    run_time: datetime  # aware, UTC
    bytes: int  # every file of the run: GRIB subsets, hourly tiles, run tiles, sidecars
    paths: list[Path]  # the run's directories: its GRIB run dir and each tile run dir
    oldest: datetime | None  # oldest file mtime (UTC); None when the run has no files
    newest: datetime | None  # newest file mtime (UTC); None when the run has no files
    grib_bytes: int = 0  # the part of `bytes` under gribs/

    @property
    def key(self) -> RunKey:
        return (self.model, self.run)

    @property
    def label(self) -> str:
        return f"{self.model} {self.run}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "run": self.run,
            "run_time": self.run_time.isoformat(),
            "bytes": self.bytes,
            "grib_bytes": self.grib_bytes,
            "paths": [str(p) for p in self.paths],
            "oldest": _iso(self.oldest),
            "newest": _iso(self.newest),
        }


@dataclass
class _Scan:
    """Sizes and mtimes of the files below a path."""

    bytes: int = 0
    files: int = 0
    oldest: float | None = None  # POSIX timestamps
    newest: float | None = None

    def add_file(self, st: os.stat_result) -> None:
        self.bytes += st.st_size
        self.files += 1
        self.oldest = st.st_mtime if self.oldest is None else min(self.oldest, st.st_mtime)
        self.newest = st.st_mtime if self.newest is None else max(self.newest, st.st_mtime)

    def merge(self, other: _Scan) -> None:
        self.bytes += other.bytes
        self.files += other.files
        for t in (other.oldest, other.newest):
            if t is not None:
                self.oldest = t if self.oldest is None else min(self.oldest, t)
                self.newest = t if self.newest is None else max(self.newest, t)


def _scan(path: Path, skip: frozenset[Path] = frozenset()) -> _Scan:
    """Every file below `path` (or `path` itself if it is not a directory), links not followed.

    Directories in `skip` are left out. Entries that vanish while we look (a writer renaming a
    temporary file into place, another prune) are simply not counted.
    """
    out = _Scan()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return out
    if not stat.S_ISDIR(st.st_mode):
        out.add_file(st)
        return out
    stack = [path]
    while stack:
        for e in _entries(stack.pop()):
            p = Path(e.path)
            try:
                if e.is_dir(follow_symlinks=False):
                    if p not in skip:
                        stack.append(p)
                else:
                    out.add_file(e.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
    return out


def _subdirs(path: Path) -> list[Path]:
    """Sub-directories of `path` with a name the layout could have written, sorted.

    Hidden names are skipped: the layout writes none below gribs/ and tiles/, and the hidden
    names that do appear there start with TEMP_PREFIX, i.e. belong to a writer that may still
    be running (see `runs_on_disk`). Links are not followed.
    """
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_run_key(name: str) -> bool:
    try:
        parse_run_key(name)
    except InvalidRequest:
        return False
    return True


def _is_res_dir(name: str) -> bool:
    """`0.25deg`, `1deg`: what `CacheLayout.tile_run_dir` writes for a resolution."""
    if not name.endswith("deg"):
        return False
    try:
        float(name[: -len("deg")])
    except ValueError:
        return False
    return True


def _run_dirs(cache: CacheLayout) -> dict[RunKey, tuple[list[Path], list[Path]]]:
    """(model, run) -> (GRIB run dirs, tile run dirs), for every run directory on disk."""
    found: dict[RunKey, tuple[list[Path], list[Path]]] = {}
    for model_dir in _subdirs(cache.gribs_root):
        for run_dir in _subdirs(model_dir):
            if _is_run_key(run_dir.name):
                found.setdefault((model_dir.name, run_dir.name), ([], []))[0].append(run_dir)
    for region_dir in _subdirs(cache.tiles_root):
        for res_dir in _subdirs(region_dir):
            if not _is_res_dir(res_dir.name):
                continue
            for model_dir in _subdirs(res_dir):
                for run_dir in _subdirs(model_dir):
                    if _is_run_key(run_dir.name):
                        found.setdefault((model_dir.name, run_dir.name), ([], []))[1].append(run_dir)
    return found


def runs_on_disk(cache: CacheLayout) -> list[RunOnDisk]:
    """Every (model, run) with a directory under gribs/ or tiles/, oldest run time first.

    Only directories at the places `CacheLayout` puts runs
    (`gribs/{model}/{run}`, `tiles/{region}/{res}deg/{model}/{run}`) whose name is a valid run
    key count. Anything else is ignored, for two reasons:

    - a name that is not a run key (`notes`, `20231345_12`) was not written by the pipeline, so
      nothing here can say which run it belongs to or how old it is; pruning deletes only what
      it can attribute to a run, and such bytes show up in `disk_usage` as not belonging to any
      run, where an operator can see them;
    - a name starting with TEMP_PREFIX is an in-progress write whose writer may still be
      running: deleting it would break that writer. `clean_stale_temp_files` removes those
      once they are old enough to be garbage.
    """
    runs = []
    for (model, run), (grib_dirs, tile_dirs) in _run_dirs(cache).items():
        total, gribs = _Scan(), _Scan()
        for d in grib_dirs:
            gribs.merge(_scan(d))
        total.merge(gribs)
        for d in tile_dirs:
            total.merge(_scan(d))
        runs.append(
            RunOnDisk(
                model=model,
                run=run,
                run_time=parse_run_key(run),
                bytes=total.bytes,
                paths=grib_dirs + tile_dirs,
                oldest=_from_ts(total.oldest),
                newest=_from_ts(total.newest),
                grib_bytes=gribs.bytes,
            )
        )
    return sorted(runs, key=_age_order)


def disk_usage(cache: CacheLayout, runs: list[RunOnDisk] | None = None) -> dict[str, Any]:
    """Bytes in the cache: in total, per model and run, and not belonging to any run.

    Pass `runs` (from `runs_on_disk`) to reuse a scan. Keys:

    - `total_bytes`: every file under the root;
    - `by_run`: `{"hrrr": {"20230125_12": 123}}`, what deep status reports as
      `resources.disk_bytes`; `grib_bytes_by_run`, same shape, the GRIB part of it;
    - `run_bytes`: the sum of `by_run`;
    - `other_bytes`: the rest, by top-level name (`weights`, `status`, `.scratch`, and `gribs` /
      `tiles` for files there outside any run directory, e.g. temporary files);
    - `cache_oldest` / `cache_newest`: the oldest and newest file mtime of any run (ISO 8601,
      UTC), None when no run has files.
    """
    runs = runs_on_disk(cache) if runs is None else runs
    by_run: dict[str, dict[str, int]] = {}
    grib_by_run: dict[str, dict[str, int]] = {}
    for r in runs:
        by_run.setdefault(r.model, {})[r.run] = r.bytes
        grib_by_run.setdefault(r.model, {})[r.run] = r.grib_bytes
    run_bytes = sum(r.bytes for r in runs)

    # Everything outside the run directories, in one pass that skips them (already counted).
    skip = frozenset(p for r in runs for p in r.paths)
    other: dict[str, int] = {}
    try:
        with os.scandir(cache.root) as it:
            top = sorted(Path(e.path) for e in it)
    except FileNotFoundError:
        top = []
    for entry in top:
        other[entry.name] = _scan(entry, skip).bytes

    oldest = [r.oldest for r in runs if r.oldest is not None]
    newest = [r.newest for r in runs if r.newest is not None]
    return {
        "total_bytes": run_bytes + sum(other.values()),
        "run_bytes": run_bytes,
        "by_run": by_run,
        "grib_bytes_by_run": grib_by_run,
        "other_bytes": other,
        "cache_oldest": _iso(min(oldest)) if oldest else None,
        "cache_newest": _iso(max(newest)) if newest else None,
    }


# -- what to remove ------------------------------------------------------------------------


@dataclass
class PrunePlan:
    """Which runs to remove and why; built by `plan_prune`, carried out by `execute_prune`."""

    remove: list[tuple[RunOnDisk, str]] = field(default_factory=list)  # run, why
    protected: list[tuple[RunOnDisk, str]] = field(default_factory=list)  # would go, but busy
    total_bytes: int = 0  # every run on disk
    bytes_to_free: int = 0
    budget_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_after(self) -> int:
        """What the runs will take once the plan is carried out."""
        return self.total_bytes - self.bytes_to_free

    def as_dict(self) -> dict[str, Any]:
        def entries(items: list[tuple[RunOnDisk, str]]) -> list[dict[str, Any]]:
            return [{"model": r.model, "run": r.run, "bytes": r.bytes, "reason": why} for r, why in items]

        return {
            "remove": entries(self.remove),
            "protected": entries(self.protected),
            "total_bytes": self.total_bytes,
            "bytes_to_free": self.bytes_to_free,
            "bytes_after": self.bytes_after,
            "budget_bytes": self.budget_bytes,
            "warnings": list(self.warnings),
        }


def plan_prune(
    runs: Iterable[RunOnDisk],
    *,
    now: datetime,
    retention_hours: Mapping[str, float],
    budget_bytes: int | None,
    busy: set[RunKey],
) -> PrunePlan:
    """Decide which runs to remove; touches nothing.

    1. Retention: every run whose run time is more than its model's `retention_hours` before
       `now` (a run exactly at the limit stays). A model missing from `retention_hours` has no
       age limit (it is kept, with a warning), since guessing one could delete data nobody
       asked to delete.
    2. Budget: if the runs left after step 1 take more than `budget_bytes` (None: no budget),
       the oldest of them by run time, across models, until the rest fits.

    Never removed:

    - a run in `busy` ((model, run) with work queued or in progress): deleting it would pull
      files from under a writer or a reader; it is listed in `protected` with the reason it
      would have gone. Busy runs still count against the budget (they occupy the disk).
    - because of the budget alone, the newest run of each model and, if that one is busy
      (still being fetched, so possibly partial), also the newest run of the model that is
      not busy: a cache that keeps fresh data must be able to serve one settled run per model.
      When the budget cannot be met without them, the plan keeps them and says so in
      `warnings` instead of emptying a model; retention still removes them, since data past
      retention is not to be served at all.
    """
    ordered = sorted(runs, key=_age_order)
    plan = PrunePlan(total_bytes=sum(r.bytes for r in ordered), budget_bytes=budget_bytes)
    protected_keys: set[RunKey] = set()

    def protect(run: RunOnDisk, why: str) -> None:
        if run.key not in protected_keys:
            protected_keys.add(run.key)
            plan.protected.append((run, f"{why}; kept: work queued or in progress"))

    # 1. retention
    kept: list[RunOnDisk] = []
    for run in ordered:
        limit = retention_hours.get(run.model)
        if limit is None:
            kept.append(run)
            continue
        age_h = (now - run.run_time).total_seconds() / 3600
        if age_h <= limit:
            kept.append(run)
            continue
        why = f"older than {limit:g} h retention (run is {age_h:.1f} h old)"
        if run.key in busy:
            protect(run, why)
            kept.append(run)
        else:
            plan.remove.append((run, why))
    for model in sorted({r.model for r in ordered} - set(retention_hours)):
        plan.warnings.append(f"no retention configured for model {model!r}: its runs are kept regardless of age")
    for model in sorted({r.model for r, _ in plan.remove} - {r.model for r in kept}):
        plan.warnings.append(f"every {model} run on disk is past retention: no {model} run will be left")

    # 2. budget, oldest first across models
    if budget_bytes is not None:
        remaining = sum(r.bytes for r in kept)
        if remaining > budget_bytes:
            why = f"disk budget {format_bytes(budget_bytes)} exceeded: oldest first"
            keep_newest = _newest_per_model(kept, busy)
            for run in kept:
                if remaining <= budget_bytes:
                    break
                if run.key in busy:
                    protect(run, why)
                elif run.key in keep_newest:
                    plan.warnings.append(
                        f"disk budget {format_bytes(budget_bytes)} cannot be met without removing "
                        f"{run.label}, the newest settled {run.model} run: kept"
                    )
                else:
                    plan.remove.append((run, why))
                    remaining -= run.bytes
            if remaining > budget_bytes:
                plan.warnings.append(
                    f"disk budget {format_bytes(budget_bytes)} exceeded after pruning: runs take "
                    f"{format_bytes(remaining)} (busy runs and the newest run per model are kept)"
                )

    plan.bytes_to_free = sum(r.bytes for r, _ in plan.remove)
    return plan


def _newest_per_model(runs: list[RunOnDisk], busy: set[RunKey]) -> set[RunKey]:
    """Per model: its newest run and, if that one is busy, its newest run that is not."""
    keep: set[RunKey] = set()
    for model in {r.model for r in runs}:
        mine = sorted((r for r in runs if r.model == model), key=_age_order, reverse=True)
        keep.add(mine[0].key)
        settled = next((r for r in mine if r.key not in busy), None)
        if settled is not None:
            keep.add(settled.key)
    return keep


# -- removing it ---------------------------------------------------------------------------


@dataclass
class RemovedRun:
    model: str
    run: str
    reason: str
    bytes_freed: int


@dataclass
class PruneResult:
    removed: list[RemovedRun] = field(default_factory=list)
    skipped: list[tuple[RunOnDisk, str]] = field(default_factory=list)  # planned, not removed
    errors: list[str] = field(default_factory=list)
    bytes_freed: int = 0  # every byte deleted, including runs that failed half-way

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": [vars(r).copy() for r in self.removed],
            "skipped": [{"model": r.model, "run": r.run, "reason": why} for r, why in self.skipped],
            "errors": list(self.errors),
            "bytes_freed": self.bytes_freed,
        }


def execute_prune(
    cache: CacheLayout,
    plan: PrunePlan,
    *,
    is_busy: Callable[[str, str], bool] | None = None,
) -> PruneResult:
    """Remove the plan's runs; each run all-or-nothing as seen by a reader.

    For each run, every directory of it is first renamed into `cache.scratch_dir` under a
    TEMP_PREFIX name (a rename within one file system is atomic), and only once all of them
    are out of the way are they deleted. A reader therefore finds a run directory complete or
    not at all. If one rename fails, the ones already done are renamed back and the run is
    reported in `errors`, left as it was. A deletion that fails half-way leaves its remains in
    the scratch directory under a TEMP_PREFIX name, where `clean_stale_temp_files` finds them.
    A cross-device rename (a run directory on another file system) is an error, not a slower
    copy-and-delete, since that would expose a half-deleted run.

    `is_busy(model, run)` is asked again just before each run goes, because work may have
    been queued since the plan was made; a run it reports busy is skipped.

    Afterwards directories left empty above removed runs (`gribs/{model}`,
    `tiles/{region}/{res}deg/{model}` and up) are removed; the root, `gribs/` and `tiles/`
    never are. Raises PruneError, before touching anything, if the plan names a path that is
    not a run directory inside the cache (e.g. a plan made for another cache).
    """
    for run, _ in plan.remove:
        for path in run.paths:
            _check_run_dir(cache, run, path)

    result = PruneResult()
    emptied: set[Path] = set()
    for run, reason in plan.remove:
        if is_busy is not None and is_busy(run.model, run.run):
            result.skipped.append((run, "work queued or in progress since the plan was made"))
            continue
        moved = _move_aside(cache, run, result.errors)
        if moved is None:
            continue
        freed, failed = 0, False
        for original, aside in moved:
            emptied.add(original.parent)
            counter = [0]
            try:
                _delete_tree(aside, counter)
            except OSError as exc:
                failed = True
                result.errors.append(f"{run.label}: deleting {aside} (was {original}): {exc}")
            freed += counter[0]
        result.bytes_freed += freed
        if not failed:
            result.removed.append(RemovedRun(run.model, run.run, reason, freed))

    _remove_empty_parents(cache, emptied)
    return result


def _check_run_dir(cache: CacheLayout, run: RunOnDisk, path: Path) -> None:
    """Refuse any path but this run's own directory under gribs/ or tiles/ of this cache.

    The plan is data that could come from elsewhere (another cache, a stale pickle, a bug);
    a wrong path here would delete far more than one run, so it is checked against the layout.
    """
    path = Path(path).absolute()
    if not cache.contains(path):
        raise PruneError(f"refusing to prune {path}: outside the cache root {cache.root}")
    if path.is_relative_to(cache.gribs_root):
        parts = path.relative_to(cache.gribs_root).parts  # (model, run)
        ok = len(parts) == 2 and path == cache.grib_run_dir(run.model, run.run)
    elif path.is_relative_to(cache.tiles_root):
        parts = path.relative_to(cache.tiles_root).parts  # (region, res, model, run)
        ok = len(parts) == 4 and _is_res_dir(parts[1]) and parts[2:] == (run.model, run.run)
    else:
        ok = False
    if not ok:
        raise PruneError(f"refusing to prune {path}: not a run directory of {run.label} under gribs/ or tiles/")


def _move_aside(cache: CacheLayout, run: RunOnDisk, errors: list[str]) -> list[tuple[Path, Path]] | None:
    """Rename each of the run's directories into scratch; on failure put them back, return None."""
    cache.scratch_dir.mkdir(parents=True, exist_ok=True)
    moved: list[tuple[Path, Path]] = []
    for path in run.paths:
        aside = cache.scratch_dir / f"{TEMP_PREFIX}prune-{run.model}-{run.run}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # already gone (another prune, an operator): nothing to hide
        except OSError as exc:
            errors.append(f"{run.label}: could not move {path} aside ({exc}); run left in place")
            for original, back in reversed(moved):
                try:
                    os.rename(back, original)
                except OSError as exc2:
                    errors.append(f"{run.label}: could not put {original} back from {back}: {exc2}")
            return None
        moved.append((Path(path), aside))
    return moved


def _delete_tree(path: Path, freed: list[int]) -> None:
    """Delete `path` (a file, a link or a directory tree) without following links.

    Adds the sizes of the files removed to `freed[0]` as it goes, so a failure half-way still
    reports what was freed. Entries that vanish meanwhile are fine.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        freed[0] += st.st_size
        return
    with os.scandir(path) as it:
        children = [Path(e.path) for e in it]
    for child in children:
        _delete_tree(child, freed)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def _remove_empty_parents(cache: CacheLayout, dirs: Iterable[Path]) -> None:
    """rmdir each directory and its ancestors while empty, stopping at gribs/, tiles/ or root."""
    stop = {cache.root, cache.gribs_root, cache.tiles_root}
    # Deepest first, so a region dir is tried after the res and model dirs inside it.
    for d in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
        d = Path(d).absolute()
        while d not in stop and cache.contains(d):
            try:
                os.rmdir(d)  # fails unless empty: never removes data
            except OSError:
                break
            d = d.parent


# -- leftovers of crashed writers -------------------------------------------------------------


def clean_stale_temp_files(
    cache: CacheLayout,
    *,
    older_than_s: float = 3600,
    now: datetime | None = None,
) -> list[Path]:
    """Remove TEMP_PREFIX files and directories anywhere under the root older than the threshold.

    Writers create such names (atomic writes, scratch downloads, prunes moving runs aside) and
    rename or delete them within seconds to minutes; one still there after `older_than_s` was
    left by a crashed process. Age is that of the newest mtime inside (for a directory), so a
    directory still being written into is not mistaken for garbage. Returns what was removed.
    """
    cutoff = (now or datetime.now(timezone.utc)).timestamp() - older_than_s
    removed: list[Path] = []
    stack = [cache.root]
    while stack:
        for e in _entries(stack.pop()):
            path = Path(e.path)
            if e.name.startswith(TEMP_PREFIX):
                try:
                    newest = _newest_mtime(path)
                    if newest is not None and newest < cutoff:
                        _delete_tree(path, [0])
                        removed.append(path)
                except OSError as exc:
                    log.warning("could not remove stale temporary %s: %s", path, exc)
            elif e.is_dir(follow_symlinks=False):
                stack.append(path)
    return sorted(removed)


def _newest_mtime(path: Path) -> float | None:
    """The newest mtime of `path` itself and, for a directory, of anything below it."""
    try:
        own = os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
    below = _scan(path).newest if os.path.isdir(path) and not os.path.islink(path) else None
    return own if below is None else max(own, below)


# -- helpers -------------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    """10_000_000_000 -> "10.0 GB" (decimal units, as disk budgets are usually written)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _age_order(run: RunOnDisk) -> tuple[datetime, str, str]:
    """Oldest run time first; model and run break ties so plans are deterministic."""
    return (run.run_time, run.model, run.run)


def _from_ts(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _entries(directory: Path) -> list[os.DirEntry]:
    """A directory's entries, or none if it vanished meanwhile (a concurrent prune or rename)."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
