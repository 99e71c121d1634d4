"""The fault table's machinery: a case, the world it runs in, and how its outcome is measured.

Every case runs a real code path (the ingest, the scanner, a Dagster materialization, the CLI,
the daemon) against the loopback mirror with one fault injected, and is measured the same way:

- outcome: `ok` when the pipeline ended as a trustworthy cache must (the fault refused with a
  clear error, or survived by a retry that succeeded), with a short description;
- partial files: temporary files left under the cache root, files of a refused hour, tiles
  that do not load or lack a sidecar, and anything written outside the cache root;
- good files lost: files present (and verified) before the fault that are missing or changed
  after it (the world is seeded with good hours first);
- message: the first line of the error the operator sees (or what succeeded);
- time to verdict: from the injection to the refusal or the successful end.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from weather_pipeline.core.cache import CacheLayout, TEMP_PREFIX, md5_file, sidecar_path
from weather_pipeline.core.http import HttpClient, HttpConfig, RetryPolicy, reset_server_states
from weather_pipeline.core.ingest import ingest_hour
from weather_pipeline.core.sources import SourceSettings
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer

#: the fixed world of the fast cases: a run of each model, "now" a few hours after it
HRRR_RUN, HRRR_HOURS = "20260512_00", (0, 1, 2)
GFS_RUN, GFS_HOURS = "20260512_06", (0, 1)
NOW = datetime(2026, 5, 12, 12, tzinfo=timezone.utc)


def build_mirror(root: Path) -> Path:
    """The NOAA-identical tree the fast cases start from (the tests' session mirror is the same)."""
    generate_run(root, "hrrr", HRRR_RUN, HRRR_HOURS)
    generate_run(root, "gfs", GFS_RUN, GFS_HOURS)
    return root


@dataclass
class Outcome:
    """What a case observed; the harness adds the measurements."""

    ok: bool
    outcome: str
    message: str
    seconds: float | None = None  # time to verdict, when the case measured it itself
    refused_hours: tuple[tuple[str, str, int], ...] = ()  # (model, run, hour) that must have no file
    partial_extra: int = 0  # partial files only the case can see (outside the cache root, ...)


@dataclass
class Row:
    case: str
    injection: str
    ok: bool
    outcome: str
    partial_files: int
    good_files_lost: int
    message: str
    seconds: float
    slow: bool = False

    def markdown(self) -> str:
        cells = [_cell(self.case, 400), _cell(self.injection, 400),
                 _cell(("ok: " if self.ok else "**NOT OK**: ") + self.outcome, 400),
                 str(self.partial_files), str(self.good_files_lost), f"`{_cell(self.message, 220, code=True)}`",
                 f"{self.seconds:.1f} s"]
        return "| " + " | ".join(cells) + " |"


def _cell(text: str, width: int, code: bool = False) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    # a table cell cannot hold a bare "|"; inside code spans GitHub still needs it escaped
    return text.replace("|", "\\|").replace("`", "'" if code else "`")


@dataclass
class Case:
    name: str
    injection: str
    run: Callable[["World"], Outcome]
    slow: bool = False
    seed: bool = True  # ingest good hours into the cache first (so something could be lost)


@dataclass
class World:
    """A fresh directory per case: a (hard-linked, tamperable) copy of the mirror and a cache."""

    base: Path
    mirror_root: Path
    cache: CacheLayout = field(init=False)
    outside: Path = field(init=False)  # a directory beside the cache: nothing may appear there

    def __post_init__(self) -> None:
        self.cache = CacheLayout(self.base / "cache")
        self.outside = self.base / "outside"
        self.outside.mkdir(parents=True, exist_ok=True)

    # -- the mirror -------------------------------------------------------------------------
    def tampered_mirror(self) -> Path:
        """A hard-linked copy of the mirror: replace files in it (never edit them in place)."""
        root = self.base / "mirror"
        if not root.exists():
            for src in self.mirror_root.rglob("*"):
                if src.is_file():
                    dest = root / src.relative_to(self.mirror_root)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.link(src, dest)
        return root

    def mirror_file(self, model: str, run: str, hour: int, suffix: str = "") -> Path:
        return self.tampered_mirror() / (mirror_relative_path(model, run, hour) + suffix)

    def replace(self, path: Path, data: bytes | str) -> None:
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    @contextmanager
    def serve(self, root: Path | None = None) -> Iterator[MirrorServer]:
        with MirrorServer(root or self.tampered_mirror()) as server:
            yield server

    # -- the pipeline's own code paths ---------------------------------------------------------
    def client(self, attempts: int = 3, **config) -> HttpClient:
        return HttpClient(HttpConfig(retry=RetryPolicy(max_attempts=attempts, initial_wait=0.05, jitter=0.05),
                                     rate_limit_db=self.base / "ratelimit.sqlite", **config))

    def ingest(self, server: MirrorServer, hour: int, model: str = "hrrr", run: str = HRRR_RUN, **kw):
        settings = kw.pop("settings", None) or SourceSettings(order=("mirror",), mirror_url=server.url)
        return ingest_hour(model, run, hour, cache=self.cache, client=kw.pop("client", None) or self.client(),
                           settings=settings, now=NOW, **kw)

    def seed(self) -> None:
        """Good files to lose: HRRR hour 0 and GFS hour 0, GRIBs and (small-region) tiles."""
        from weather_pipeline.core.tiles import build_hour

        with MirrorServer(self.mirror_root) as server:
            self.ingest(server, 0)
            self.ingest(server, 0, model="gfs", run=GFS_RUN)
        build_hour("hrrr", HRRR_RUN, 0, self.cache, regions=["kansas"])
        build_hour("gfs", GFS_RUN, 0, self.cache, regions=["kansas"])


def snapshot(cache: CacheLayout) -> dict[str, str]:
    """md5 of every data file in the cache (GRIBs, tiles, sidecars), by path."""
    out = {}
    for kind in ("gribs", "tiles"):
        root = cache.root / kind
        if root.exists():
            for p in root.rglob("*"):
                if p.is_file() and not p.name.startswith(TEMP_PREFIX):
                    out[str(p)] = md5_file(p)
    return out


def partial_files(world: World, refused: tuple[tuple[str, str, int], ...]) -> list[str]:
    """Everything a trustworthy cache must not hold after the fault (see the module docstring)."""
    bad = []
    root = world.cache.root
    if root.exists():
        bad += [str(p) for p in root.rglob(f"{TEMP_PREFIX}*") if ".scratch" not in p.parts]
        for tile in (root / "tiles").rglob("tile_*.npz") if (root / "tiles").exists() else ():
            if not sidecar_path(tile).is_file():
                bad.append(f"{tile} (no sidecar)")
                continue
            try:
                with np.load(tile) as z:
                    z["data"]
            except Exception:  # noqa: BLE001 - any unreadable tile is partial
                bad.append(f"{tile} (does not load)")
        for model, run, hour in refused:
            bad += [str(p) for p in world.cache.grib_paths_for_hour(model, run, hour).values()]
    bad += [str(p) for p in world.outside.rglob("*")]
    return bad


def lost_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(p for p, md5 in before.items() if after.get(p) != md5)


def run_case(case: Case, base: Path, mirror_root: Path) -> Row:
    """Run one case in a fresh world under `base`; measure it."""
    reset_server_states()  # circuit breakers are per process: every case starts clean
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    world = World(base, mirror_root)
    if case.seed:
        world.seed()
    before = snapshot(world.cache)
    t0 = time.monotonic()
    try:
        outcome = case.run(world)
    except Exception as exc:  # noqa: BLE001 - a case that blows up is a row that says so
        outcome = Outcome(False, f"the case itself failed: {type(exc).__name__}", f"{type(exc).__name__}: {exc}")
    elapsed = outcome.seconds if outcome.seconds is not None else time.monotonic() - t0
    partial = partial_files(world, outcome.refused_hours)
    lost = lost_files(before, snapshot(world.cache))
    reset_server_states()
    return Row(case.name, case.injection, outcome.ok and not partial and not lost, outcome.outcome,
               len(partial) + outcome.partial_extra, len(lost), outcome.message.strip().splitlines()[0]
               if outcome.message.strip() else "", elapsed, case.slow)


def refused(exc_type: type[BaseException], action: Callable[[], object], *phrases: str,
            hours: tuple[tuple[str, str, int], ...] = (), what: str = "") -> Outcome:
    """Run `action`, expecting `exc_type` whose message has every phrase: the usual refusal case."""
    t0 = time.monotonic()
    try:
        action()
    except exc_type as exc:
        seconds = time.monotonic() - t0
        text = str(exc)
        missing = [p for p in phrases if p not in text]
        ok = not missing
        desc = what or f"refused: {type(exc).__name__}"
        if missing:
            desc += f" (message lacks {missing})"
        return Outcome(ok, desc, f"{type(exc).__name__}: {text}", seconds, hours)
    except Exception as exc:  # noqa: BLE001
        return Outcome(False, f"wrong error {type(exc).__name__}, expected {exc_type.__name__}",
                       f"{type(exc).__name__}: {exc}", time.monotonic() - t0, hours)
    return Outcome(False, f"not refused: expected {exc_type.__name__}", "succeeded", time.monotonic() - t0, hours)


def survived(action: Callable[[], object], check: Callable[[object], str | None], what: str) -> Outcome:
    """Run `action`, expecting it to succeed despite the fault; `check` says what is wrong, if anything."""
    t0 = time.monotonic()
    try:
        result = action()
    except Exception as exc:  # noqa: BLE001
        return Outcome(False, f"failed: {type(exc).__name__}", f"{type(exc).__name__}: {exc}", time.monotonic() - t0)
    seconds = time.monotonic() - t0
    problem = check(result)
    return Outcome(problem is None, what if problem is None else f"{what}, but {problem}",
                   problem or "succeeded", seconds)


TABLE_HEADER = (
    "| case | injection | outcome | partial files | good files lost | message | time to verdict |\n"
    "|---|---|---|---|---|---|---|"
)


def markdown_table(rows: list[Row]) -> str:
    return "\n".join([TABLE_HEADER] + [r.markdown() for r in rows])
