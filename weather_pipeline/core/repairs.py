"""Repair tickets: forecast hours whose cached files were found damaged and must be redone.

Whoever finds damage (the tile builder refusing a changed or corrupt GRIB, the cache
verification check) moves the bad file to quarantine and opens a ticket; the sensors read the
tickets and request the work that repairs them (a ticket of kind `refetch` re-ingests the hour,
after which its tiles follow; `rebuild` rebuilds the tiles from the GRIB still on disk), and the
run that repairs the hour closes it. Deep status lists the open ones.

One small JSON file per (model, run, hour, kind) under `cache/status/repairs/`, created and
removed atomically, so concurrent finders and repairers never lose each other's updates.
Dagster's own "wipe partition" is not supported by its SQL storages, hence our own record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from weather_pipeline.core.cache import CacheLayout, atomic_write_text

log = logging.getLogger(__name__)

REFETCH = "refetch"  # the GRIB subset must be ingested again (tiles follow)
REBUILD = "rebuild"  # the tiles must be rebuilt from the GRIB subset on disk
KINDS = (REFETCH, REBUILD)


@dataclass(frozen=True)
class RepairTicket:
    model: str
    run: str
    hour: int
    kind: str  # REFETCH or REBUILD
    problem: str
    files: list[str] = field(default_factory=list)
    opened_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def open_ticket(cache: CacheLayout, model: str, run: str, hour: int, kind: str, problem: str,
                files: list[str] | None = None, *, now: datetime | None = None) -> RepairTicket:
    if kind not in KINDS:
        raise ValueError(f"unknown repair kind {kind!r}; known: {', '.join(KINDS)}")
    moment = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ticket = RepairTicket(model, run, hour, kind, problem, list(files or []), moment)
    atomic_write_text(cache.repair_ticket_path(model, run, hour, kind), ticket.to_json())
    log.warning("repair ticket %s %s f%03d (%s): %s", model, run, hour, kind, problem)
    return ticket


def open_tickets(cache: CacheLayout, model: str | None = None) -> list[RepairTicket]:
    """Every open ticket (of one model), oldest run first; unreadable files are skipped."""
    root = cache.repairs_dir
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob(f"{model or '*'}/*/*.json")):
        try:
            data = json.loads(path.read_text())
            out.append(RepairTicket(**{k: data[k] for k in RepairTicket.__dataclass_fields__ if k in data}))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable repair ticket %s: %r", path, exc)
    return out


def close_tickets(cache: CacheLayout, model: str, run: str, hour: int, kinds: tuple[str, ...] = KINDS) -> int:
    """Close the hour's tickets of these kinds (the repair is done); returns how many were open."""
    closed = 0
    for kind in kinds:
        path = cache.repair_ticket_path(model, run, hour, kind)
        try:
            path.unlink()
            closed += 1
        except FileNotFoundError:
            pass
    return closed
