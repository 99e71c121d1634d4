"""The cache layout (every path the pipeline writes comes from here) and atomic writes.

    {root}/gribs/{model}/{run}/{variable}/grib_{hour:03d}.grib2
    {root}/tiles/{region}/{res}deg/{model}/{run}/{variable}/tile_{hour:03d}.npz  (+ .meta.json)
    {root}/tiles/{region}/{res}deg/{model}/{run}/{variable}.npz                 (+ .meta.json)
    {root}/weights/...          regridding indices and weights, keyed by grid hash
    {root}/status/deep.json     (deep status)
    {root}/status/sources/{model}.json  (what the source has per run, written by ScanSource)
    {root}/status/repairs/{model}/{run}/{hour:03d}.{kind}.json  (damaged hours to redo)
    {root}/quarantine/...       damaged files moved out of the way (same relative paths), kept for a look
    {root}/.locks/...           one lock file per forecast hour being written (flock)

Nothing is ever written outside the root: every path is built from names the catalog checked
(`[a-z0-9_]` words, run keys, hours) and checked again here, so a hostile name fails loudly.
Nothing is half-written inside it: files are written under a temporary name in the destination
directory and renamed into place, which is atomic on POSIX file systems, so a reader sees the
old file or the new one, never a mix; `commit_files` stages every file of a forecast hour
before renaming any, so a full disk leaves the hour as it was. A write that fails raises
CacheWriteError naming the file and the space left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

#: Prefix of in-progress files; anything starting with it is garbage if its writer is gone.
TEMP_PREFIX = ".tmp-"
#: what a model, variable or region name may be: it becomes a directory name
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_RUN_RE = re.compile(r"\d{8}_\d{2}")


class CacheWriteError(OSError):
    """A cache file could not be written (disk full, read-only, permissions); nothing partial is left."""

    def __str__(self) -> str:
        return str(self.strerror)


class UnsafePath(ValueError):
    """A path component that could leave the cache root or is not a name the catalog allows."""


def check_name(kind: str, value: str) -> str:
    """`value` if it is a safe directory name for a model, variable or region; UnsafePath if not."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise UnsafePath(f"{kind} name {value!r} is not allowed: use lowercase letters, digits and '_', "
                         "starting with a letter (it becomes a cache directory name)")
    return value


def _check_run(run: str) -> str:
    if not isinstance(run, str) or not _RUN_RE.fullmatch(run):
        raise UnsafePath(f"run key {run!r} is not YYYYMMDD_HH")
    return run


def _check_hour(hour: int) -> int:
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 9999:
        raise UnsafePath(f"forecast hour {hour!r} is not an integer between 0 and 9999")
    return hour


@dataclass(frozen=True)
class CacheLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    # -- GRIB subsets --------------------------------------------------------------------
    @property
    def gribs_root(self) -> Path:
        return self.root / "gribs"

    def grib_run_dir(self, model: str, run: str) -> Path:
        return self.gribs_root / check_name("model", model) / _check_run(run)

    def grib_path(self, model: str, run: str, variable: str, hour: int) -> Path:
        return self.grib_run_dir(model, run) / check_name("variable", variable) / f"grib_{_check_hour(hour):03d}.grib2"

    def grib_paths_for_hour(self, model: str, run: str, hour: int) -> dict[str, Path]:
        """The GRIB subsets present on disk for one forecast hour, by variable."""
        run_dir = self.grib_run_dir(model, run)
        if not run_dir.is_dir():
            return {}
        name = f"grib_{_check_hour(hour):03d}.grib2"
        return {d.name: d / name for d in sorted(run_dir.iterdir())
                if NAME_RE.fullmatch(d.name) and (d / name).is_file()}

    # -- tiles ---------------------------------------------------------------------------
    @property
    def tiles_root(self) -> Path:
        return self.root / "tiles"

    def tile_run_dir(self, region: str, res: float, model: str, run: str) -> Path:
        return (self.tiles_root / check_name("region", region) / f"{format_res(res)}deg"
                / check_name("model", model) / _check_run(run))

    def tile_path(self, region: str, res: float, model: str, run: str, variable: str, hour: int) -> Path:
        """The hourly tile; its sidecar is `sidecar_path(tile_path(...))`."""
        return (self.tile_run_dir(region, res, model, run) / check_name("variable", variable)
                / f"tile_{_check_hour(hour):03d}.npz")

    def run_tile_path(self, region: str, res: float, model: str, run: str, variable: str) -> Path:
        """All hours of a run that exist, stacked."""
        return self.tile_run_dir(region, res, model, run) / f"{check_name('variable', variable)}.npz"

    def hourly_tiles(self, region: str, res: float, model: str, run: str, variable: str) -> dict[int, Path]:
        d = self.tile_run_dir(region, res, model, run) / check_name("variable", variable)
        if not d.is_dir():
            return {}
        return {int(p.stem[5:]): p for p in sorted(d.glob("tile_[0-9][0-9][0-9].npz"))}

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    # -- status ----------------------------------------------------------------------------
    @property
    def status_dir(self) -> Path:
        return self.root / "status"

    def source_availability_path(self, model: str) -> Path:
        return self.status_dir / "sources" / f"{check_name('model', model)}.json"

    def integrity_path(self, model: str) -> Path:
        """What the last cache verification of a model found, and the files it found good."""
        return self.status_dir / "integrity" / f"{check_name('model', model)}.json"

    @property
    def repairs_dir(self) -> Path:
        return self.status_dir / "repairs"

    def repair_ticket_path(self, model: str, run: str, hour: int, kind: str) -> Path:
        """An open repair ticket of one forecast hour (see core/repairs.py)."""
        return (self.repairs_dir / check_name("model", model) / _check_run(run)
                / f"{_check_hour(hour):03d}.{check_name('kind', kind)}.json")

    # -- quarantine and locks ------------------------------------------------------------
    def quarantine_path(self, source: Path) -> Path:
        """Where a GRIB subset found corrupt is moved: same relative path under quarantine/."""
        rel = Path(source).absolute().relative_to(self.root)
        return self.root / "quarantine" / rel

    def hour_lock_path(self, kind: str, model: str, run: str, hour: int) -> Path:
        """The lock a writer of one forecast hour holds (`kind`: "gribs" or "tiles")."""
        return (self.root / ".locks" / check_name("kind", kind) / check_name("model", model) / _check_run(run)
                / f"{_check_hour(hour):03d}.lock")

    @property
    def deep_status_path(self) -> Path:
        return self.status_dir / "deep.json"

    # -- scratch space on the same file system (so renames stay atomic) -------------------
    @property
    def scratch_dir(self) -> Path:
        return self.root / ".scratch"

    def scratch_file(self, suffix: str = "") -> Path:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=self.scratch_dir)
        os.close(fd)
        return Path(name)

    def contains(self, path: Path) -> bool:
        return Path(os.path.normpath(Path(path).absolute())).is_relative_to(self.root)

    def free_bytes(self) -> int | None:
        """Space left on the cache's file system, or None if the root does not exist yet."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return shutil.disk_usage(probe).free
        except OSError:
            return None


@contextmanager
def hour_lock(cache: CacheLayout, kind: str, model: str, run: str, hour: int, *, timeout: float = 900.0,
              on_wait=None) -> Iterator[bool]:
    """Hold the writer's lock of one forecast hour; yields True if another writer held it first.

    Two materializations of the same partition never interleave their writes: the second waits
    here (up to `timeout`, then FileLock's Timeout). The lock is an flock, so a killed writer's
    lock is released by the kernel, and whoever holds it may delete temporary files left beside
    the hour's files (`sweep_dead_temps`): no live writer can own them.
    """
    with _flock(cache.hour_lock_path(kind, model, run, hour), timeout, on_wait) as waited:
        yield waited


@contextmanager
def file_lock(cache: CacheLayout, target: Path, *, timeout: float = 900.0) -> Iterator[bool]:
    """Hold the writer's lock of one cache file (a run tile, rewritten by any run of its hours)."""
    rel = Path(target).absolute().relative_to(cache.root)
    with _flock(cache.root / ".locks" / "files" / (str(rel).replace("/", "__") + ".lock"), timeout, None) as waited:
        yield waited


def sweep_dead_temps(paths: Iterable[Path]) -> list[Path]:
    """Remove the temporary files atomic writers left beside these destinations.

    Call only while holding the destinations' lock: then any such temp file belongs to a writer
    that died (a killed worker), never to a live one.
    """
    removed = []
    for dest in paths:
        dest = Path(dest)
        try:
            entries = list(dest.parent.iterdir())
        except FileNotFoundError:
            continue
        prefix = TEMP_PREFIX + dest.name + "."
        for entry in entries:
            if entry.name.startswith(prefix):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


@contextmanager
def _flock(path: Path, timeout: float, on_wait) -> Iterator[bool]:
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        if on_wait:
            on_wait()
        lock.acquire(timeout=timeout)
    try:
        yield waited
    finally:
        lock.release()


def format_res(res: float) -> str:
    """0.25 -> "0.25", 1.0 -> "1": the resolution as written in tile paths."""
    return format(float(res), "g")


def sidecar_path(npz_path: Path) -> Path:
    """`x.npz` -> `x.meta.json`."""
    return Path(npz_path).with_suffix(".meta.json")


def _write_error(path: Path, exc: OSError) -> CacheWriteError:
    free = None
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path(path).anchor or "/").free
    except OSError:
        pass
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}.get(exc.errno, exc.strerror)
    left = f"; {free} bytes free" if free is not None else ""
    err = CacheWriteError(exc.errno or 0, f"cannot write {path}: {what or exc}{left}; nothing was left half-written")
    err.filename = str(path)
    return err


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success fsync and rename it into place.

    On any failure the temporary file is removed and the old `path` (if any) is untouched; an
    OSError from the file system becomes CacheWriteError naming `path`.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, CacheWriteError):
            raise
        raise _write_error(path, exc) from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def commit_files(files: Iterable[tuple[Path, bytes]]) -> None:
    """Write several files as one change: stage (write + fsync) every temp file, then rename all.

    If any staging write fails (a full disk), every temp file is removed and no destination is
    touched, so a forecast hour is never left with some variables new and some missing.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
            except OSError as exc:
                raise _write_error(path, exc) from exc
            staged.append((Path(tmp_name), path))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp_name, 0o644)
            except OSError as exc:
                raise _write_error(path, exc) from exc
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
