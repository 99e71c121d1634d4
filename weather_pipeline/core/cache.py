"""The cache layout (every path the pipeline writes comes from here) and atomic writes.

    {root}/gribs/{model}/{run}/{variable}/grib_{hour:03d}.grib2
    {root}/tiles/{region}/{res}deg/{model}/{run}/{variable}/tile_{hour:03d}.npz  (+ .meta.json)
    {root}/tiles/{region}/{res}deg/{model}/{run}/{variable}.npz                 (+ .meta.json)
    {root}/weights/...          regridding indices and weights, keyed by grid hash
    {root}/status/deep.json     (deep status)
    {root}/status/sources/{model}.json  (what the source has per run, written by ScanSource)

Nothing is ever written outside the root, and nothing is half-written inside it: files are
written under a temporary name in the destination directory and renamed into place, which is
atomic on POSIX file systems, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

#: Prefix of in-progress files; anything starting with it is garbage if its writer is gone.
TEMP_PREFIX = ".tmp-"


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
        return self.gribs_root / model / run

    def grib_path(self, model: str, run: str, variable: str, hour: int) -> Path:
        return self.grib_run_dir(model, run) / variable / f"grib_{hour:03d}.grib2"

    def grib_paths_for_hour(self, model: str, run: str, hour: int) -> dict[str, Path]:
        """The GRIB subsets present on disk for one forecast hour, by variable."""
        run_dir = self.grib_run_dir(model, run)
        if not run_dir.is_dir():
            return {}
        name = f"grib_{hour:03d}.grib2"
        return {d.name: d / name for d in sorted(run_dir.iterdir()) if (d / name).is_file()}

    # -- tiles ---------------------------------------------------------------------------
    @property
    def tiles_root(self) -> Path:
        return self.root / "tiles"

    def tile_run_dir(self, region: str, res: float, model: str, run: str) -> Path:
        return self.tiles_root / region / f"{format_res(res)}deg" / model / run

    def tile_path(self, region: str, res: float, model: str, run: str, variable: str, hour: int) -> Path:
        """The hourly tile; its sidecar is `sidecar_path(tile_path(...))`."""
        return self.tile_run_dir(region, res, model, run) / variable / f"tile_{hour:03d}.npz"

    def run_tile_path(self, region: str, res: float, model: str, run: str, variable: str) -> Path:
        """All hours of a run that exist, stacked."""
        return self.tile_run_dir(region, res, model, run) / f"{variable}.npz"

    def hourly_tiles(self, region: str, res: float, model: str, run: str, variable: str) -> dict[int, Path]:
        d = self.tile_run_dir(region, res, model, run) / variable
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
        return self.status_dir / "sources" / f"{model}.json"

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
        return Path(path).absolute().is_relative_to(self.root)


def format_res(res: float) -> str:
    """0.25 -> "0.25", 1.0 -> "1": the resolution as written in tile paths."""
    return format(float(res), "g")


def sidecar_path(npz_path: Path) -> Path:
    """`x.npz` -> `x.meta.json`."""
    return Path(npz_path).with_suffix(".meta.json")


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
