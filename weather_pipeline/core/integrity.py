"""Cache verification: are the files on disk still the ones the pipeline wrote and recorded?

A GRIB subset must have the md5 its ingest recorded, or be gone because every tile of its hour
was built from exactly those bytes (retired). A tile must open, lie on its region's grid, and
hold values whose statistics are the ones its sidecar recorded; the sidecar must name the GRIB
md5 the ingest recorded. Anything else is damage: `repair_damage` moves the bad files to
quarantine and opens a repair ticket (core/repairs.py) so the sensors redo the hour: re-ingest
it when its GRIB is bad or gone, rebuild its tiles when only they are.

Verifying every byte of a large cache each hour would be wasteful, so a verification remembers
the size and mtime of each file it found good (`cache/status/integrity/{model}.json`) and
re-reads only files that changed since, unless asked for a full pass.

Pure core: the Dagster side passes the recorded md5s (from the materializations) in.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from weather_pipeline.core.cache import CacheLayout, atomic_write_text, md5_file, sidecar_path
from weather_pipeline.core.catalog import Model
from weather_pipeline.core.repairs import REBUILD, REFETCH, RepairTicket, open_ticket
from weather_pipeline.core.tiles import TileTarget, field_stats, quarantine, read_sidecar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Damage:
    model: str
    run: str
    hour: int
    variable: str
    kind: str  # "grib", "tile" or "sidecar"
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Verification:
    """What one pass found: files checked (read) and skipped as unchanged, and the damage."""

    checked: int = 0
    unchanged: int = 0
    damage: list[Damage] = field(default_factory=list)
    good: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns) found good


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class _Memory:
    """Files found good before, by (size, mtime_ns): skipped unless they changed."""

    def __init__(self, known: Mapping[str, Sequence[int]], full: bool):
        self.known = {} if full else {k: tuple(v) for k, v in known.items()}

    def unchanged(self, path: Path, stamp: tuple[int, int] | None) -> bool:
        return stamp is not None and self.known.get(str(path)) == stamp


def load_memory(cache: CacheLayout, model: str) -> dict[str, list[int]]:
    try:
        return json.loads(cache.integrity_path(model).read_text()).get("good", {})
    except (OSError, ValueError, AttributeError):
        return {}


def save_memory(cache: CacheLayout, model: str, result: Verification, checked_at: str) -> None:
    doc = {"model": model, "checked_at": checked_at, "checked": result.checked, "unchanged": result.unchanged,
           "damage": [asdict(d) for d in result.damage], "good": {k: list(v) for k, v in sorted(result.good.items())}}
    atomic_write_text(cache.integrity_path(model), json.dumps(doc, indent=1))


def verify_gribs(cache: CacheLayout, model: Model, run: str, hour: int, recorded: Mapping[str, str],
                 targets: Sequence[TileTarget], memory: _Memory, out: Verification, *, kept: bool) -> None:
    """The hour's GRIB subsets against the md5s their ingest recorded. `kept`: the model keeps
    its GRIBs after tiling, so a missing one is damage even when its tiles exist."""
    for variable, md5 in sorted(recorded.items()):
        if variable not in model.variables:
            continue
        path = cache.grib_path(model.name, run, variable, hour)
        stamp = _stamp(path)
        if stamp is None:
            tiles = [cache.tile_path(t.region, t.res, model.name, run, variable, hour) for t in targets]
            metas = [read_sidecar(p) for p in tiles]
            if not kept and tiles and all(m and p.is_file() and m.get("source_grib_md5") == md5
                                          for m, p in zip(metas, tiles)):
                continue  # retired: every tile was built from exactly these bytes
            out.damage.append(Damage(model.name, run, hour, variable, "grib", str(path),
                                     "missing (the model keeps its GRIBs)" if kept
                                     else "missing, and its tiles were not (all) built from it"))
            continue
        if memory.unchanged(path, stamp):
            out.unchanged += 1
            out.good[str(path)] = stamp
            continue
        out.checked += 1
        actual = md5_file(path)
        if actual != md5:
            out.damage.append(Damage(model.name, run, hour, variable, "grib", str(path),
                                     f"md5 {actual}, the ingest recorded {md5}"))
        else:
            out.good[str(path)] = stamp


def tile_problem(path: Path, target: TileTarget, meta: dict[str, Any] | None, recorded_md5: str | None) -> str | None:
    """Why an hourly tile is not what its sidecar says (None when it is)."""
    if meta is None:
        return "sidecar missing or unreadable"
    if recorded_md5 is not None and meta.get("source_grib_md5") != recorded_md5:
        return f"sidecar names GRIB md5 {meta.get('source_grib_md5')}, the ingest recorded {recorded_md5}"
    try:
        with np.load(path) as z:
            data, lat, lon = z["data"], z["lat"], z["lon"]
    except FileNotFoundError:
        return "tile missing"
    except Exception as exc:  # noqa: BLE001 - any way a file fails to load is damage
        return f"does not load as a tile ({type(exc).__name__}: {exc})"
    grid = target.grid
    if data.dtype != np.float32 or data.shape != grid.shape:
        return f"data is {data.dtype} {data.shape}, the grid is float32 {grid.shape}"
    if not (np.array_equal(lat, grid.lats) and np.array_equal(lon, grid.lons)):
        return "lat/lon are not the region's grid"
    stats, recorded = field_stats(data), meta.get("stats") or {}
    for key, value in stats.items():
        want = recorded.get(key)
        if value is None or want is None:
            if value != want:
                return f"stats.{key} is {value}, the sidecar recorded {want}"
        elif not math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-12):
            return f"stats.{key} is {value:.9g}, the sidecar recorded {want:.9g}: the values changed"
    return None


def verify_tiles(cache: CacheLayout, model: Model, run: str, hour: int, targets: Sequence[TileTarget],
                 recorded: Mapping[str, str] | None, memory: _Memory, out: Verification) -> None:
    """Every hourly tile of the hour against its sidecar (and the ingest's md5, when known)."""
    for var in model.variables.values():
        if not var.default or not var.present_at(hour):
            continue
        for t in targets:
            path = cache.tile_path(t.region, t.res, model.name, run, var.name, hour)
            side = sidecar_path(path)
            stamp, side_stamp = _stamp(path), _stamp(side)
            if stamp is not None and side_stamp is not None and memory.unchanged(path, stamp) \
                    and memory.unchanged(side, side_stamp):
                out.unchanged += 1
                out.good[str(path)], out.good[str(side)] = stamp, side_stamp
                continue
            out.checked += 1
            meta = read_sidecar(path)
            problem = "tile missing" if stamp is None else tile_problem(path, t, meta, (recorded or {}).get(var.name))
            if problem is None:
                out.good[str(path)], out.good[str(side)] = stamp, side_stamp  # type: ignore[assignment]
                continue
            kind = "sidecar" if problem.startswith("sidecar") else "tile"
            out.damage.append(Damage(model.name, run, hour, var.name, kind, str(path if kind == "tile" else side), problem))


def repair_damage(cache: CacheLayout, damage: Iterable[Damage]) -> list[RepairTicket]:
    """Quarantine every damaged file and open one ticket per hour: refetch when a GRIB is bad or
    gone (its tiles follow), else rebuild the tiles from the GRIB on disk."""
    by_hour: dict[tuple[str, str, int], list[Damage]] = {}
    for d in damage:
        by_hour.setdefault((d.model, d.run, d.hour), []).append(d)
    tickets = []
    for (model, run, hour), items in sorted(by_hour.items()):
        moved = []
        for d in items:
            for path in {Path(d.path), sidecar_path(Path(d.path)) if d.kind == "tile" else Path(d.path)}:
                if path.exists() and cache.contains(path):
                    dest = quarantine(cache, path)
                    if dest:
                        moved.append(str(dest))
        gribs_left = cache.grib_paths_for_hour(model, run, hour)
        needs_grib = any(d.kind == "grib" for d in items) or any(d.variable not in gribs_left for d in items)
        problem = "; ".join(str(d) for d in items)[:2000]
        tickets.append(open_ticket(cache, model, run, hour, REFETCH if needs_grib else REBUILD, problem,
                                   [d.path for d in items] + moved))
    return tickets
