"""wgrib2 inventories (`.idx` files): parse, search, and plan byte-range requests.

A line reads `msg:start_byte:d=YYYYMMDDHH:VAR:LEVEL:FORECAST:` e.g.
`71:44599509:d=2023110401:TMP:2 m above ground:5 hour fcst:`. A message ends one byte
before the next *different* start offset (submessages `12.1`, `12.2` share one); the last
message runs to the end of the file, so its range is open-ended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence


class IdxError(ValueError):
    """A malformed inventory, or a search that does not single out a message."""


@dataclass(frozen=True)
class IdxEntry:
    msg: str  # "71" or "12.1"
    start: int
    end: int | None  # inclusive last byte; None when the message runs to end of file
    date: str  # "2023110401"
    variable: str
    level: str
    forecast: str
    line: str  # the original line, what search patterns are matched against

    @property
    def length(self) -> int | None:
        return None if self.end is None else self.end - self.start + 1

    @property
    def description(self) -> str:
        return f"{self.variable}:{self.level}:{self.forecast}"

    def as_json(self) -> dict:
        return {
            "msg": self.msg,
            "start": self.start,
            "end": self.end,
            "variable": self.variable,
            "level": self.level,
            "forecast": self.forecast,
        }


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range; `end` None means "to the end of the file"."""

    start: int
    end: int | None

    @property
    def header(self) -> str:
        return f"bytes={self.start}-" if self.end is None else f"bytes={self.start}-{self.end}"

    @property
    def length(self) -> int | None:
        return None if self.end is None else self.end - self.start + 1


_LINE_RE = re.compile(r"^(\d+(?:\.\d+)?):(\d+):d=(\d{8,10}):(.*)$")


def parse_idx(text: str, *, source: str = "<idx>", file_size: int | None = None) -> list[IdxEntry]:
    """Parse inventory text. With `file_size`, the last message's end is made explicit."""
    raw: list[tuple[str, int, str, str, str, str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise IdxError(f"{source}: line {lineno} is not a wgrib2 inventory line: {line[:120]!r}")
        msg, start, date, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        # The rest is VAR:LEVEL:FORECAST: plus optional extra fields (ensemble info etc).
        # VAR never contains ':' (even "var discipline=0 center=7 ..." uses spaces).
        fields = rest.split(":")
        if len(fields) < 3:
            raise IdxError(f"{source}: line {lineno} lacks VAR:LEVEL:FORECAST: {line[:120]!r}")
        raw.append((msg, start, date, fields[0], fields[1], fields[2], line))
    if not raw:
        raise IdxError(f"{source}: inventory is empty")

    starts = sorted({r[1] for r in raw})
    next_start = {s: n for s, n in zip(starts, starts[1:])}
    entries = []
    prev_start = -1
    for msg, start, date, var, level, fcst, line in raw:
        if start < prev_start:
            raise IdxError(f"{source}: message {msg} starts at {start}, before the previous message")
        prev_start = start
        nxt = next_start.get(start)
        end = nxt - 1 if nxt is not None else (file_size - 1 if file_size else None)
        entries.append(IdxEntry(msg, start, end, date, var, level, fcst, line))
    return entries


def search(entries: Sequence[IdxEntry], pattern: str | re.Pattern[str]) -> list[IdxEntry]:
    """Entries whose inventory line matches the regular expression (re.search)."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return [e for e in entries if rx.search(e.line)]


def find_one(entries: Sequence[IdxEntry], pattern: str | re.Pattern[str], *, source: str = "<idx>") -> list[IdxEntry]:
    """The message(s) of one field: all entries matching, which must describe one field.

    Several matches are accepted only when they describe the same field (HRRR f01 carries
    two identical `0-1 hour acc fcst` APCP messages): the first is returned. Submessages of
    one message are returned together, as they can only be fetched together.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    hits = search(entries, rx)
    if not hits:
        raise IdxError(f"{source}: no message matches {rx.pattern!r}")
    descriptions = {h.description for h in hits}
    if len(descriptions) > 1:
        listed = "; ".join(f"{h.msg}:{h.description}" for h in hits[:6])
        raise IdxError(f"{source}: pattern {rx.pattern!r} matches different fields: {listed}")
    return [hits[0]]


def ranges_for(entries: Iterable[IdxEntry]) -> list[ByteRange]:
    """Byte ranges covering the given entries, adjacent or shared messages merged into one.

    Two messages are adjacent when one ends exactly one byte before the next starts; an
    open-ended message swallows everything after it.
    """
    spans = sorted({(e.start, e.end) for e in entries}, key=lambda s: s[0])
    merged: list[ByteRange] = []
    for start, end in spans:
        if merged:
            last = merged[-1]
            if last.end is None or start <= last.end + 1:
                new_end = None if (last.end is None or end is None) else max(last.end, end)
                merged[-1] = ByteRange(last.start, new_end)
                continue
        merged.append(ByteRange(start, end))
    return merged


def format_idx_line(entry: IdxEntry) -> str:
    return f"{entry.msg}:{entry.start}:d={entry.date}:{entry.variable}:{entry.level}:{entry.forecast}:"
