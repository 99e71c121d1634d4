"""GRIB bytes: framing, verification, wgrib2-style inventories and field reading.

Everything here works on bytes (or a path for `read_field`) and imports nothing from Dagster:

* `iter_message_spans` frames a buffer into GRIB messages by their `GRIB` markers and section 0
  lengths, tolerating the few padding bytes NOAA files sometimes carry between messages.
* `verify_messages` is what the downloader runs on every byte range before committing it: the
  framing above, the GRIB2 section chain, a full eccodes decode of every field and, when the
  caller knows the variable, a plausible-range check on the decoded values.
* `describe` names a field the way wgrib2 does in NOAA's `.idx` inventories (`TMP`,
  `2 m above ground`, `0-5 hour acc fcst`), and `build_index` writes a whole `.idx`, so a
  missing NOAA index can be rebuilt and the synthetic mirror writes indexes the same way.
  `parameter_codes` and `encode_level` are the inverses the mirror generator uses.
* `read_field` decodes one field into a float32 (Ny, Nx) array plus its grid description.

The wgrib2 tables themselves (parameter abbreviations, level names) live in `grib_names`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# The package __init__ has already imported pyproj, which must load before eccodes.
import eccodes

from weather_pipeline.core import grib_names as names

#: Non-GRIB bytes tolerated between messages or after the last one (NOAA's HRRR files have
#: carried a single stray byte between messages); anything longer is reported.
MAX_PADDING = 16

_MARKER = re.compile(b"GRIB")
_END = b"7777"
#: wgrib2 prints this for a fixed-surface value that is missing but needed by the format.
_UNDEFINED = 9.999e20
_NCEP = 7


class GribError(ValueError):
    """Bytes that are not (complete, decodable, plausible) GRIB; the message says where and why."""


# ------------------------------------------------------------------------------------------
# Framing
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageSpan:
    """One GRIB message inside a buffer: byte offset, total length and GRIB edition."""

    offset: int
    length: int
    edition: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Section:
    """One section of a GRIB2 message: number, offset from the message start, length."""

    number: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _preview(view: memoryview, start: int, size: int = 40) -> str:
    return repr(bytes(view[start : start + size]))


def iter_message_spans(
    data: bytes | bytearray | memoryview, *, source: str = "<bytes>"
) -> list[MessageSpan]:
    """Frame `data` into GRIB messages.

    Messages are found by their `GRIB` marker (not assumed back to back), their length read
    from section 0 (GRIB2: octets 9-16; GRIB1: octets 5-7) and their `7777` end checked.
    Up to MAX_PADDING stray bytes between or after messages are skipped; any other non-GRIB
    bytes, a truncated message or a missing end marker raise GribError naming `source` and the
    byte offset.
    """
    view = _as_view(data)
    size = len(view)
    if size == 0:
        raise GribError(f"{source}: empty data (0 bytes) where GRIB messages were expected")
    spans: list[MessageSpan] = []
    pos = 0
    while pos < size:
        found = _MARKER.search(view, pos)
        if found is None:
            if not spans:
                raise GribError(
                    f"{source}: no GRIB marker in {size} bytes; the data starts with "
                    f"{_preview(view, 0)}"
                )
            if size - pos > MAX_PADDING:
                raise GribError(
                    f"{source}: {size - pos} bytes after the last GRIB message (from byte {pos}) "
                    f"are not GRIB data: {_preview(view, pos)}"
                )
            break
        start = found.start()
        gap = start - pos
        if gap and (not spans or gap > MAX_PADDING):
            where = "before the first GRIB message" if not spans else "between GRIB messages"
            raise GribError(
                f"{source}: {gap} unexpected bytes at byte {pos} {where} (next GRIB marker at "
                f"byte {start}): {_preview(view, pos)}"
            )
        span = _section0(view, start, source)
        spans.append(span)
        pos = span.end
    return spans


def _section0(view: memoryview, start: int, source: str) -> MessageSpan:
    remain = len(view) - start
    if remain < 8:
        raise GribError(
            f"{source}: message at byte {start} is truncated: only {remain} bytes of its "
            f"section 0 remain"
        )
    edition = view[start + 7]
    if edition == 2:
        if remain < 16:
            raise GribError(
                f"{source}: message at byte {start} is truncated: only {remain} bytes of its "
                f"16-byte section 0 remain"
            )
        length = int.from_bytes(view[start + 8 : start + 16], "big")
        minimum = 16 + len(_END)
    elif edition == 1:
        length = int.from_bytes(view[start + 4 : start + 7], "big")
        minimum = 8 + len(_END)
    else:
        raise GribError(
            f"{source}: message at byte {start} claims GRIB edition {edition}; only editions "
            f"1 and 2 exist (data there: {_preview(view, start)})"
        )
    if length < minimum:
        raise GribError(
            f"{source}: message at byte {start} claims an impossible length of {length} bytes"
        )
    if length > remain:
        raise GribError(
            f"{source}: message at byte {start} claims {length} bytes but only {remain} remain "
            f"(truncated)"
        )
    tail = bytes(view[start + length - 4 : start + length])
    if tail != _END:
        raise GribError(
            f"{source}: message at byte {start} ({length} bytes) does not end with '7777' "
            f"(its last 4 bytes are {tail!r})"
        )
    return MessageSpan(start, length, edition)


#: Which GRIB2 section may follow which (92.9: sections 2-7 may repeat for several fields).
_NEXT_SECTION = {0: {1}, 1: {2, 3}, 2: {3}, 3: {4}, 4: {5}, 5: {6}, 6: {7}, 7: {2, 3, 4}}


def grib2_sections(
    message: bytes | bytearray | memoryview, *, source: str = "<bytes>", offset: int = 0
) -> list[Section]:
    """Walk the section chain of one GRIB2 message (section 0 first, `7777` excluded).

    The section lengths must chain from section 1 to the `7777` end exactly and the sections
    must come in GRIB2 order; `offset` (the message's position in its file) is only used in
    error messages.
    """
    view = _as_view(message)
    total = len(view)
    if total < 20 or bytes(view[:4]) != b"GRIB" or view[7] != 2:
        raise GribError(f"{source}: no GRIB2 message at byte {offset}")
    claimed = int.from_bytes(view[8:16], "big")
    if claimed != total:
        raise GribError(
            f"{source}: message at byte {offset} claims {claimed} bytes in section 0 but "
            f"{total} bytes were framed"
        )
    sections = [Section(0, 0, 16)]
    pos = 16
    while True:
        if pos + 4 == total and bytes(view[pos:total]) == _END:
            break
        if pos + 5 > total - 4:
            raise GribError(
                f"{source}: message at byte {offset}: section lengths do not add up to its "
                f"total length {total} (next section header at byte {offset + pos})"
            )
        length = int.from_bytes(view[pos : pos + 4], "big")
        number = view[pos + 4]
        previous = sections[-1].number
        if number not in _NEXT_SECTION[previous]:
            raise GribError(
                f"{source}: message at byte {offset}: found section {number} at byte "
                f"{offset + pos} after section {previous} (corrupted section header?)"
            )
        if length < 5 or pos + length > total - 4:
            raise GribError(
                f"{source}: message at byte {offset}: section {number} at byte {offset + pos} "
                f"claims {length} bytes, so section lengths do not add up to the total length "
                f"{total}"
            )
        sections.append(Section(number, pos, length))
        pos += length
    if sections[-1].number != 7:
        raise GribError(
            f"{source}: message at byte {offset} ends after section {sections[-1].number}, "
            f"not after a data section"
        )
    return sections


def _field_messages(message: bytes, sections: list[Section]) -> list[bytes]:
    """One standalone GRIB2 message per field of a (possibly multi-field) message.

    A multi-field message repeats sections 2-7 (or 3-7, 4-7); each field inherits the latest
    earlier copy of the sections it does not repeat.  Bitmap indicator 254 ("the previously
    defined bitmap applies") is replaced by that bitmap so each field stands alone.
    """
    if sum(1 for s in sections if s.number == 7) == 1:
        return [message]
    current: dict[int, bytes] = {}
    last_bitmap: bytes | None = None
    fields: list[bytes] = []
    for sec in sections[1:]:
        raw = message[sec.offset : sec.end]
        if sec.number == 6:
            if raw[5] == 0:
                last_bitmap = raw
            elif raw[5] == 254:
                if last_bitmap is None:
                    raise GribError("bitmap indicator 254 without an earlier bitmap")
                raw = last_bitmap
        current[sec.number] = raw
        if sec.number == 7:
            body = b"".join(current.get(n, b"") for n in (1, 2, 3, 4, 5, 6, 7))
            total = 16 + len(body) + len(_END)
            fields.append(message[:8] + total.to_bytes(8, "big") + body + _END)
    return fields


def _message_fields(view: memoryview, span: MessageSpan, source: str) -> list[bytes]:
    message = bytes(view[span.offset : span.end])
    if span.edition != 2:
        return [message]
    return _field_messages(message, grib2_sections(message, source=source, offset=span.offset))


# ------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------


def verify_messages(
    data: bytes | bytearray | memoryview,
    *,
    source: str,
    expected: int | None = None,
    valid_range: tuple[float, float] | None = None,
) -> int:
    """Check that `data` is complete, decodable GRIB and return its number of messages.

    Frames the data (`iter_message_spans`), checks the GRIB2 section chain, decodes every
    field's values with eccodes and checks that eccodes agrees on the message length and
    returns finite values.  With `expected`, the message count must match.

    GRIB2 has no checksum: eccodes decodes a data section with zeroed or flipped bytes without
    complaint.  With complex packing and spatial differencing (all NOAA files) such damage is
    integrated into every later value, which then run far outside physical bounds, so pass the
    variable's `valid_range` (e.g. the catalog's) to catch it; missing (bitmapped) points are
    ignored.
    """
    view = _as_view(data)
    spans = iter_message_spans(view, source=source)
    if expected is not None and len(spans) != expected:
        raise GribError(f"{source}: expected {expected} GRIB messages, found {len(spans)}")
    for number, span in enumerate(spans, 1):
        fields = _message_fields(view, span, source)
        for message in fields:
            _verify_field(message, span, number, len(fields) == 1, source, valid_range)
    return len(spans)


def _verify_field(
    message: bytes,
    span: MessageSpan,
    number: int,
    whole: bool,
    source: str,
    valid_range: tuple[float, float] | None,
) -> None:
    where = f"{source}: message {number} at byte {span.offset}"
    try:
        handle = eccodes.codes_new_from_message(message)
    except eccodes.CodesInternalError as exc:
        raise GribError(f"{where}: eccodes cannot parse it: {exc}") from None
    try:
        total = eccodes.codes_get(handle, "totalLength", int)
        if whole and total != span.length:
            raise GribError(
                f"{where}: eccodes reads a total length of {total} bytes, framed {span.length}"
            )
        values = eccodes.codes_get_values(handle)
        points = eccodes.codes_get(handle, "numberOfDataPoints", int)
        if values.size != points:
            raise GribError(f"{where}: decoded {values.size} values for {points} grid points")
        valid = ~_missing_mask(handle, values)
        good = values[valid]
        if not np.isfinite(good).all():
            raise GribError(f"{where}: decoded values include NaN or infinity")
        if valid_range is not None and good.size:
            low, high = valid_range
            vmin, vmax = float(good.min()), float(good.max())
            if vmin < low or vmax > high:
                raise GribError(
                    f"{where}: decoded values span [{vmin:g}, {vmax:g}], outside the plausible "
                    f"range [{low:g}, {high:g}]; the data section is probably corrupted"
                )
    except eccodes.CodesInternalError as exc:
        raise GribError(f"{where}: eccodes cannot decode it: {exc}") from None
    finally:
        eccodes.codes_release(handle)


def _missing_mask(handle: Any, values: np.ndarray) -> np.ndarray:
    """Points eccodes reports as missing (bitmap or complex-packing missing management)."""
    uses_missing = _get_int(handle, "bitmapPresent") or _get_int(
        handle, "missingValueManagementUsed"
    )
    if not uses_missing:
        return np.zeros(values.shape, dtype=bool)
    return values == eccodes.codes_get(handle, "missingValue", float)


# ------------------------------------------------------------------------------------------
# Message identity (headers only, no value decode)
# ------------------------------------------------------------------------------------------

#: minutes per unit of code table 4.4, for the units forecast times are given in
_MINUTES = {0: 1, 1: 60, 2: 1440, 10: 180, 11: 360, 12: 720, 13: 1 / 60}


@dataclass(frozen=True, slots=True)
class MessageIdentity:
    """What a GRIB2 message says it is, read from its sections 1 and 4 without decoding values.

    `inventory` is the wgrib2 text of parameter, level and forecast (what `.idx` lines and the
    catalog's patterns speak); `parameter` is (discipline, category, number); `levels` the two
    fixed-surface types; `reference_time` the run; `start_hour`/`end_hour` the forecast time
    (equal for an instantaneous field; the interval for a statistic, e.g. 0 and 5 for a 0-5 hour
    accumulation); `statistic` the process of code table 4.10 (1 = accumulation) or None.
    """

    inventory: InventoryFields
    parameter: tuple[int, int, int]
    levels: tuple[int, int]
    reference_time: datetime
    start_hour: float | None
    end_hour: float | None
    statistic: int | None

    def idx_line(self, msg: str = "1", start: int = 0) -> str:
        """The `.idx` line wgrib2 would write for this message (what catalog patterns match)."""
        return f"{msg}:{start}:d={self.reference_time:%Y%m%d%H}:{self.inventory}:"

    def __str__(self) -> str:
        return f"{self.inventory} (run {self.reference_time:%Y-%m-%d %H:%M}Z)"


def _hours(value: int | None, unit: int | None) -> float | None:
    if value is None or unit is None or unit not in _MINUTES:
        return None
    return value * _MINUTES[unit] / 60


def message_identity(message: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> MessageIdentity:
    """The identity of one GRIB2 message (one field) from its headers; GribError if unreadable."""
    try:
        handle = eccodes.codes_new_from_message(bytes(message))
    except eccodes.CodesInternalError as exc:
        raise GribError(f"{source}: eccodes cannot parse the message headers: {exc}") from None
    try:
        total = eccodes.codes_get(handle, "totalLength", int)
        if total != len(message):
            raise GribError(f"{source}: eccodes reads a total length of {total} bytes, framed {len(message)}")
        inventory = describe(handle)
        parameter = (
            eccodes.codes_get(handle, "discipline", int),
            _get_int(handle, "parameterCategory") or 0,
            _get_int(handle, "parameterNumber") or 0,
        )
        levels = (
            _get_int(handle, "typeOfFirstFixedSurface") or 255,
            _get_int(handle, "typeOfSecondFixedSurface") or 255,
        )
        start = _hours(_get_int(handle, "forecastTime"), _get_int(handle, "indicatorOfUnitOfTimeRange"))
        ranges = _get_int(handle, "numberOfTimeRange")
        statistic = None
        end = start
        if ranges:
            statistic = _get_int(handle, "typeOfStatisticalProcessing")
            length = _hours(_get_int(handle, "lengthOfTimeRange"), _get_int(handle, "indicatorOfUnitForTimeRange"))
            end = None if start is None or length is None else start + length
        return MessageIdentity(inventory, parameter, levels, _reference_time(handle), start, end, statistic)
    except eccodes.CodesInternalError as exc:
        raise GribError(f"{source}: eccodes cannot read the message headers: {exc}") from None
    finally:
        eccodes.codes_release(handle)


def message_identities(data: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> list[MessageIdentity]:
    """The identity of every field in `data` (framed first; multi-field messages split)."""
    view = _as_view(data)
    out = []
    for span in iter_message_spans(view, source=source):
        if span.edition != 2:
            raise GribError(f"{source}: the message at byte {span.offset} is GRIB{span.edition}, not GRIB2")
        out += [message_identity(m, source=source) for m in _message_fields(view, span, source)]
    return out


# ------------------------------------------------------------------------------------------
# wgrib2 naming
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InventoryFields:
    """The three fields wgrib2 prints for a field: variable, level and forecast time."""

    variable: str
    level: str
    forecast: str

    def __str__(self) -> str:
        return f"{self.variable}:{self.level}:{self.forecast}"


@dataclass(frozen=True, slots=True)
class StatisticalRange:
    """One statistical-processing time range of a product definition (e.g. template 4.8)."""

    process: int  # code table 4.10 (1 = accumulation)
    increment_type: int  # code table 4.11 (2 = successive times, same reference time)
    unit: int  # code table 4.4 of `length`
    length: int
    increment_unit: int = 255
    increment: int = 0
    missing: int = 0  # number of missing values in the statistical process


def _get_int(handle: Any, key: str) -> int | None:
    """An integer key, or None when the template has no such key or it is missing."""
    if not eccodes.codes_is_defined(handle, key):
        return None
    try:
        if eccodes.codes_is_missing(handle, key):
            return None
    except eccodes.CodesInternalError:
        pass
    return int(eccodes.codes_get(handle, key, int))


def _sign_magnitude(value: int, bits: int) -> int:
    """GRIB2 stores negative integers as sign and magnitude; eccodes reads some as unsigned."""
    sign = 1 << (bits - 1)
    return -(value - sign) if value >= sign else value


def parameter_name(
    discipline: int,
    category: int,
    number: int,
    *,
    centre: int = _NCEP,
    master_table: int = 2,
    local_table: int = 1,
) -> str:
    """wgrib2's abbreviation for a parameter, or its `var discipline=...` fallback form."""
    local_range = (
        192 <= number <= 254 or 192 <= category <= 254 or 192 <= discipline <= 254
    )
    key = (discipline, category, number)
    if master_table == 255 or local_range:
        found = names.NCEP_LOCAL_PARAMETERS.get(key) if centre == _NCEP else None
    else:
        found = names.WMO_PARAMETERS.get(key)
    if found:
        return found
    if local_range:
        return (
            f"var discipline={discipline} center={centre} local_table={local_table} "
            f"parmcat={category} parm={number}"
        )
    return (
        f"var discipline={discipline} master_table={master_table} parmcat={category} "
        f"parm={number}"
    )


def _f32(value: float) -> float:
    """Round through float32, as wgrib2 holds level values in C floats."""
    return float(np.float32(value))


def _surface_value(factor: int | None, value: int | None) -> float | None:
    """wgrib2's scaled2flt: value * 10**-factor, as a C float."""
    if factor is None or value is None:
        return None
    if factor == 0:
        return _f32(value)
    if factor < 0:
        return _f32(value * 10.0 ** (-factor))
    return _f32(value / 10.0**factor)


def _fill(template: str, *values: float | None) -> str:
    if "%g" not in template:
        return template.replace("%%", "%")
    return template % tuple(_UNDEFINED if v is None else v for v in values)


def _level1(surface_type: int, value: float | None, centre: int) -> str:
    if surface_type < 192:
        if surface_type in names.PRESSURE_LEVEL_TYPES and value is not None:
            value = _f32(value * 0.01)
        return _fill(names.LEVELS.get(surface_type, "reserved"), value)
    if surface_type == 255:
        return ""
    if centre == _NCEP:
        if surface_type == 235 and value is not None:
            value = _f32(value * 0.01)
        return _fill(names.NCEP_LOCAL_LEVELS.get(surface_type, "reserved"), value)
    if value is None:
        return f"local level type {surface_type}"
    return f"local level type {surface_type} {value:g}"


def format_level(
    type1: int,
    value1: float | None,
    type2: int = 255,
    value2: float | None = None,
    *,
    centre: int = _NCEP,
) -> str:
    """wgrib2's level text for two fixed surfaces (values in SI units, None when missing)."""
    if type1 == type2 and type1 in names.LAYERS:
        if type1 in names.PRESSURE_LEVEL_TYPES:
            value1 = None if value1 is None else _f32(value1 / 100)
            value2 = None if value2 is None else _f32(value2 / 100)
        return _fill(names.LAYERS[type1], value1, value2)
    special = names.SPECIAL_LAYERS.get((type1, type2))
    if special:
        return special
    if centre == _NCEP and type1 == type2 and type1 in (235, 236):
        scale = 0.1 if type1 == 235 else 10.0
        text = "%g-%gC ocean isotherm layer" if type1 == 235 else "%g-%g m ocean layer"
        return _fill(text, *(None if v is None else v * scale for v in (value1, value2)))
    text = _level1(type1, value1, centre)
    if type2 != 255:
        text += " - " + _level1(type2, value2, centre)
    return text


def _time_unit(unit: int) -> str:
    return names.TIME_UNITS.get(unit, "?")


def _normalize_time(unit: int, value: int) -> tuple[int, int]:
    hours = names.MULTI_HOUR_UNITS.get(unit)
    return (1, value * hours) if hours else (unit, value)


def _time_range(unit1: int, value1: int, unit2: int, value2: int, separator: str = "-") -> str:
    """wgrib2's print_ftime2: 'v1-(v1+v2) unit', moving to a coarser unit when both fit."""
    unit1, value1 = _normalize_time(unit1, value1)
    unit2, value2 = _normalize_time(unit2, value2)
    if value1 == 0:
        unit1 = unit2
    elif value2 == 0:
        unit2 = unit1
    if unit1 != unit2:
        return (
            f"{value1} {_time_unit(unit1)}{separator}({value1} {_time_unit(unit1)}+"
            f"{value2} {_time_unit(unit2)})"
        )
    for small, big, factor in ((13, 0, 60), (0, 1, 60), (1, 2, 24), (3, 4, 12)):
        if unit1 == small and value1 % factor == 0 and value2 % factor == 0:
            value1, value2, unit1 = value1 // factor, value2 // factor, big
    return f"{value1}{separator}{value1 + value2} {_time_unit(unit1)}"


def _process_name(code: int, centre: int) -> str:
    if code in names.STATISTICAL_PROCESSES:
        return names.STATISTICAL_PROCESSES[code]
    if centre == _NCEP and code in names.NCEP_STATISTICAL_PROCESSES:
        return names.NCEP_STATISTICAL_PROCESSES[code]
    return "???"


def format_forecast(
    unit: int,
    forecast_time: int,
    statistics: StatisticalRange | None = None,
    *,
    centre: int = _NCEP,
    parameter: tuple[int, int, int] | None = None,
    master_table: int = 2,
) -> str:
    """wgrib2's forecast text (its -ftime, version 2) for one time range at most.

    `unit` and `forecast_time` are code table 4.4 and the forecast time of the product
    definition (the start of the interval for statistics).  `parameter` (discipline, category,
    number) only matters for NCEP's old TMAX/TMIN encoding with a missing process.
    """
    if statistics is None:
        if forecast_time == 0:
            return "anl"
        unit, forecast_time = _normalize_time(unit, forecast_time)
        return f"{forecast_time} {_time_unit(unit)} fcst"
    s = statistics
    process = _process_name(s.process, centre)
    missing = f",missing={s.missing}"
    if s.increment_type == 0:
        return "Code Table 4.11=reserved"
    if s.increment_type == 1 and s.increment == 0:
        text = _time_range(s.unit, 0, s.unit, s.length)
        if forecast_time == 0:
            return f"{text} {process} anl"
        return f"{text} {process}({forecast_time} {_time_unit(unit)} fcst)"
    if s.increment_type == 1:
        if s.unit == s.increment_unit:
            count = s.length // s.increment + 1
            text = f"{count}@{s.increment} {_time_unit(s.increment_unit)} {process}"
        else:
            text = (
                f"{s.length} {_time_unit(s.unit)}s@{s.increment} {_time_unit(s.increment_unit)} "
                f"{process}"
            )
        if forecast_time == 0:
            return f"{text}(anl){missing}"
        unit, forecast_time = _normalize_time(unit, forecast_time)
        return f"{text}({forecast_time} {_time_unit(unit)} fcst){missing}"
    if s.increment_type == 2 and s.increment == 0:
        text = _time_range(unit, forecast_time, s.unit, s.length)
        ncep_extreme = (
            parameter is not None
            and parameter[0] == 0
            and parameter[1] == 0
            and parameter[2] in (4, 5)
            and centre == _NCEP
            and master_table <= 5
            and s.process == 255
        )
        return f"{text} fcst" if ncep_extreme else f"{text} {process} fcst"
    if s.increment_type == 2:
        inc_unit, inc = _normalize_time(s.increment_unit, s.increment)
        text = _time_range(unit, forecast_time, s.unit, s.length)
        return f"{text} {process}@(fcst,dt={inc} {_time_unit(inc_unit)}){missing}"
    if s.increment_type == 3 and s.increment == 0:
        inner = _time_range(unit, forecast_time, s.unit, -s.length, separator=":")
        return f"0-{s.length} {_time_unit(s.unit)} {process}({inner} fcst)"
    if s.increment_type in (3, 4):
        return (
            f"ensemble {process}-{s.increment_type} valid {forecast_time} {_time_unit(unit)}"
        )
    if s.increment_type == 5:
        return f"{_time_range(unit, forecast_time, s.unit, s.length)} (subinterval) {process}"
    return f"Code Table 4.11={s.increment_type}"


def _surfaces(handle: Any, which: str) -> tuple[int, float | None]:
    surface_type = _get_int(handle, f"typeOf{which}FixedSurface")
    if surface_type is None or surface_type == 255:
        return 255, None
    factor = _get_int(handle, f"scaleFactorOf{which}FixedSurface")
    value = _get_int(handle, f"scaledValueOf{which}FixedSurface")
    if factor is not None and factor > 127:
        factor = _sign_magnitude(factor, 8)
    if value is not None:
        value = _sign_magnitude(value, 32)
    return surface_type, _surface_value(factor, value)


def describe(handle: Any) -> InventoryFields:
    """The variable, level and forecast strings wgrib2 prints for an eccodes GRIB2 handle.

    Unknown parameters come out in wgrib2's `var discipline=... parmcat=... parm=...` form.
    Products with more than one statistical time range (climatologies) are not spelled out
    like wgrib2 does; they read `N statistical time ranges`.
    """
    edition = eccodes.codes_get(handle, "editionNumber", int)
    if edition != 2:
        raise GribError(f"wgrib2 inventories describe GRIB2 fields only, not GRIB{edition}")
    discipline = eccodes.codes_get(handle, "discipline", int)
    centre = eccodes.codes_get(handle, "centre", int)
    master_table = eccodes.codes_get(handle, "tablesVersion", int)
    local_table = eccodes.codes_get(handle, "localTablesVersion", int)
    category = _get_int(handle, "parameterCategory")
    number = _get_int(handle, "parameterNumber")
    category = 255 if category is None else category
    number = 255 if number is None else number
    variable = parameter_name(
        discipline,
        category,
        number,
        centre=centre,
        master_table=master_table,
        local_table=local_table,
    )
    type1, value1 = _surfaces(handle, "First")
    type2, value2 = _surfaces(handle, "Second")
    level = format_level(type1, value1, type2, value2, centre=centre)
    forecast = _describe_forecast(handle, centre, (discipline, category, number), master_table)
    return InventoryFields(variable, level, forecast)


def _describe_forecast(
    handle: Any, centre: int, parameter: tuple[int, int, int], master_table: int
) -> str:
    unit = _get_int(handle, "indicatorOfUnitOfTimeRange")
    forecast_time = _get_int(handle, "forecastTime")
    if unit is None or forecast_time is None:
        return "anl"  # templates without a forecast time (e.g. satellite products)
    ranges = _get_int(handle, "numberOfTimeRange")
    if ranges is None:
        return format_forecast(unit, forecast_time, centre=centre)
    if ranges != 1:
        return f"{ranges} statistical time ranges"
    def code(key: str, default: int) -> int:
        value = _get_int(handle, key)
        return default if value is None else value

    statistics = StatisticalRange(
        process=code("typeOfStatisticalProcessing", 255),
        increment_type=code("typeOfTimeIncrement", 255),
        unit=code("indicatorOfUnitForTimeRange", 255),
        length=code("lengthOfTimeRange", 0),
        increment_unit=code("indicatorOfUnitForTimeIncrement", 255),
        increment=code("timeIncrement", 0),
        missing=code("numberOfMissingInStatisticalProcess", 0),
    )
    return format_forecast(
        unit,
        forecast_time,
        statistics,
        centre=centre,
        parameter=parameter,
        master_table=master_table,
    )


# ------------------------------------------------------------------------------------------
# Inverse naming (used by the mirror generator)
# ------------------------------------------------------------------------------------------


_VAR_LOCAL = re.compile(
    r"var discipline=(\d+) center=(\d+) local_table=(\d+) parmcat=(\d+) parm=(\d+)"
)
_VAR_MASTER = re.compile(r"var discipline=(\d+) master_table=(\d+) parmcat=(\d+) parm=(\d+)")


@lru_cache(maxsize=1)
def _codes_by_name() -> dict[str, tuple[int, int, int]]:
    codes: dict[str, tuple[int, int, int]] = {}
    # WMO codes first: they read the same for any centre; NCEP local codes fill the rest.
    for table in (names.WMO_PARAMETERS, names.NCEP_LOCAL_PARAMETERS):
        for key, name in table.items():
            codes.setdefault(name, key)
    return codes


def parameter_codes(name: str, *, centre: int = _NCEP) -> tuple[int, int, int]:
    """(discipline, category, number) that `describe` prints as `name` for `centre`.

    Accepts wgrib2's `var discipline=...` forms too.  KeyError for unknown names.
    """
    local = _VAR_LOCAL.fullmatch(name)
    if local:
        discipline, var_centre, _table, category, number = map(int, local.groups())
        if var_centre != centre:
            raise KeyError(f"{name!r} is a local parameter of centre {var_centre}, not {centre}")
        return discipline, category, number
    master = _VAR_MASTER.fullmatch(name)
    if master:
        discipline, _table, category, number = map(int, master.groups())
        return discipline, category, number
    codes = _codes_by_name()
    if name not in codes or (centre != _NCEP and name not in names.WMO_PARAMETERS.values()):
        raise KeyError(f"no GRIB2 parameter is named {name!r} in wgrib2's tables")
    return codes[name]


@dataclass(frozen=True, slots=True)
class FixedSurfaces:
    """The fixed-surface keys of a product definition (values scaled as GRIB2 stores them)."""

    type1: int
    factor1: int
    value1: int
    type2: int = 255
    factor2: int = 0
    value2: int = 0

    def eccodes_keys(self) -> dict[str, int]:
        """Keys to set with eccodes; negative scaled values go in as sign and magnitude."""

        def raw(value: int) -> int:
            return value if value >= 0 else (1 << 31) | -value

        return {
            "typeOfFirstFixedSurface": self.type1,
            "scaleFactorOfFirstFixedSurface": self.factor1,
            "scaledValueOfFirstFixedSurface": raw(self.value1),
            "typeOfSecondFixedSurface": self.type2,
            "scaleFactorOfSecondFixedSurface": self.factor2,
            "scaledValueOfSecondFixedSurface": raw(self.value2),
        }

    def values(self) -> tuple[float | None, float | None]:
        return (
            _surface_value(self.factor1, self.value1),
            _surface_value(self.factor2, self.value2) if self.type2 != 255 else None,
        )


_NUMBER = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)"  # what C's %g prints
_Patterns = list[tuple[re.Pattern[str], int]]


def _pattern(template: str) -> re.Pattern[str]:
    parts = template.replace("%%", "\0").split("%g")
    return re.compile(_NUMBER.join(re.escape(p).replace("\0", "%") for p in parts))


@lru_cache(maxsize=4)
def _level_patterns(centre: int) -> tuple[_Patterns, _Patterns]:
    """(layer patterns, single-level patterns), each with its fixed surface type."""
    layers = [(_pattern(t), surface_type) for surface_type, t in names.LAYERS.items()]
    singles = dict(names.LEVELS)
    if centre == _NCEP:
        singles.update(names.NCEP_LOCAL_LEVELS)
    levels = [(_pattern(t), surface_type) for surface_type, t in singles.items()]
    return layers, levels


def _scaled(text: str, surface_type: int) -> tuple[int, int]:
    """(scale factor, scaled value) for a printed level value, exactly."""
    value = Decimal(text)
    if surface_type in names.PRESSURE_LEVEL_TYPES:
        value *= 100  # printed in mb, stored in Pa
    value = value.normalize()
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent >= 0:
        return 0, int(value)
    return -exponent, int(value.scaleb(-exponent))


def _single_level(text: str, centre: int) -> tuple[int, int, int] | None:
    for pattern, surface_type in _level_patterns(centre)[1]:
        match = pattern.fullmatch(text)
        if match:
            if match.groups():
                return (surface_type, *_scaled(match.group(1), surface_type))
            return surface_type, 0, 0
    return None


def encode_level(level: str, *, centre: int = _NCEP) -> FixedSurfaces:
    """The fixed surfaces that `format_level` prints as `level`; ValueError if none do."""
    surfaces: FixedSurfaces | None = None
    for pattern, surface_type in _level_patterns(centre)[0]:
        match = pattern.fullmatch(level)
        if match:
            factor1, value1 = _scaled(match.group(1), surface_type)
            factor2, value2 = _scaled(match.group(2), surface_type)
            surfaces = FixedSurfaces(surface_type, factor1, value1, surface_type, factor2, value2)
            break
    if surfaces is None:
        single = _single_level(level, centre)
        if single is not None:
            surfaces = FixedSurfaces(*single)
        elif " - " in level:
            first, second = level.split(" - ", 1)
            one, two = _single_level(first, centre), _single_level(second, centre)
            if one is not None and two is not None:
                surfaces = FixedSurfaces(*one, *two)
    if surfaces is None:
        raise ValueError(f"no GRIB2 fixed surfaces print as level {level!r}")
    value1, value2 = surfaces.values()
    printed = format_level(surfaces.type1, value1, surfaces.type2, value2, centre=centre)
    if printed != level:
        raise ValueError(f"level {level!r} encodes to surfaces that print as {printed!r}")
    return surfaces


# ------------------------------------------------------------------------------------------
# Inventories
# ------------------------------------------------------------------------------------------


def _reference_time(handle: Any) -> datetime:
    date = eccodes.codes_get(handle, "dataDate", int)
    hhmm = eccodes.codes_get(handle, "dataTime", int)
    return datetime(
        date // 10000, date // 100 % 100, date % 100, hhmm // 100, hhmm % 100, tzinfo=timezone.utc
    )


def build_index(
    data: bytes | bytearray | memoryview,
    *,
    run_time: datetime | None = None,
    source: str = "<bytes>",
) -> str:
    """The wgrib2 inventory (`.idx` text) of a whole GRIB2 file.

    One line per field, `N:START:d=YYYYMMDDHH:VAR:LEVEL:FORECAST:`, with N 1-based and START
    the byte offset of the message; the fields of a multi-field message are numbered N.1, N.2,
    ... and share START.  `d=` is each field's reference time; with `run_time`, every field
    must have that reference time (GribError otherwise), a guard against indexing the wrong run.
    """
    expected = None
    if run_time is not None:
        aware = run_time if run_time.tzinfo else run_time.replace(tzinfo=timezone.utc)
        expected = aware.astimezone(timezone.utc)
    view = _as_view(data)
    lines: list[str] = []
    for number, span in enumerate(iter_message_spans(view, source=source), 1):
        if span.edition != 2:
            raise GribError(
                f"{source}: message {number} at byte {span.offset} is GRIB{span.edition}; "
                f"wgrib2 inventories exist for GRIB2 only"
            )
        fields = _message_fields(view, span, source)
        for sub, message in enumerate(fields, 1):
            handle = eccodes.codes_new_from_message(message)
            try:
                reference = _reference_time(handle)
                inventory = describe(handle)
            finally:
                eccodes.codes_release(handle)
            if expected is not None and reference != expected:
                raise GribError(
                    f"{source}: message {number} at byte {span.offset} has reference time "
                    f"{reference:%Y-%m-%d %H:%M}Z, not the run {expected:%Y-%m-%d %H:%M}Z"
                )
            label = str(number) if len(fields) == 1 else f"{number}.{sub}"
            lines.append(f"{label}:{span.offset}:d={reference:%Y%m%d%H}:{inventory}:")
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------------------------------
# Reading values
# ------------------------------------------------------------------------------------------

GRID_KEYS = (
    "gridType",
    "Nx",
    "Ny",
    "latitudeOfFirstGridPointInDegrees",
    "longitudeOfFirstGridPointInDegrees",
    "latitudeOfLastGridPointInDegrees",
    "longitudeOfLastGridPointInDegrees",
    "LaDInDegrees",
    "LoVInDegrees",
    "Latin1InDegrees",
    "Latin2InDegrees",
    "DxInMetres",
    "DyInMetres",
    "iDirectionIncrementInDegrees",
    "jDirectionIncrementInDegrees",
    "scanningMode",
    "shapeOfTheEarth",
    "radius",
    "uvRelativeToGrid",
)


@dataclass(frozen=True)
class Field:
    """One decoded field: values (Ny, Nx) float32 in the file's scanning order, NaN where
    missing; the eccodes grid keys; and light metadata (shortName, units, stepRange, ...)."""

    values: np.ndarray
    grid_keys: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    inventory: InventoryFields | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]


def _grid_keys(handle: Any) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for key in GRID_KEYS:
        if not eccodes.codes_is_defined(handle, key):
            continue
        try:
            if eccodes.codes_is_missing(handle, key):
                continue
        except eccodes.CodesInternalError:
            pass
        keys[key] = eccodes.codes_get(handle, key)
    return keys


#: the metadata `read_field` reads by default (a few ms: some are computed keys)
METADATA_KEYS = ("shortName", "name", "units", "stepRange", "dataDate", "dataTime")


def read_field(
    data_or_path: bytes | bytearray | memoryview | str | Path, index: int = 0, *, describe_field: bool = True,
    metadata_keys: Sequence[str] = METADATA_KEYS,
) -> Field:
    """Decode field number `index` (0-based, counting the fields of multi-field messages).

    Values come back as float32 shaped (Ny, Nx) in the file's scanning order (HRRR's rows run
    south to north, GFS's north to south), NaN where a bitmap masks points or where the
    packing's missing value appears. `describe_field=False` skips the metadata strings and the
    inventory description (a few ms per field), for callers that only need values and grid;
    `metadata_keys` narrows the strings read (e.g. just "units").
    """
    if isinstance(data_or_path, (str, Path)):
        source = str(data_or_path)
        data: bytes | bytearray | memoryview = Path(data_or_path).read_bytes()
    else:
        source, data = "<bytes>", data_or_path
    if index < 0:
        raise IndexError(f"field index must be >= 0, not {index}")
    view = _as_view(data)
    count = 0
    for span in iter_message_spans(view, source=source):
        for message in _message_fields(view, span, source):
            if count == index:
                return _decode_field(message, describe_field, metadata_keys)
            count += 1
    raise IndexError(f"{source} holds {count} fields; there is no field {index}")


def _decode_field(message: bytes, describe_field: bool = True, metadata_keys: Sequence[str] = METADATA_KEYS) -> Field:
    handle = eccodes.codes_new_from_message(message)
    try:
        grid = _grid_keys(handle)
        values = eccodes.codes_get_values(handle)
        missing = _missing_mask(handle, values)
        nx = _get_int(handle, "Nx") or _get_int(handle, "Ni")
        ny = _get_int(handle, "Ny") or _get_int(handle, "Nj")
        out = values.astype(np.float32)
        out[missing] = np.nan
        if nx and ny and nx * ny == out.size:
            scanning = _get_int(handle, "scanningMode") or 0
            # bit 3 (0x20): adjacent points run along j (columns) instead of along i (rows)
            out = out.reshape(nx, ny).T.copy() if scanning & 0x20 else out.reshape(ny, nx)
        metadata: dict[str, Any] = {}
        inventory = None
        if describe_field:
            metadata = {
                key: eccodes.codes_get(handle, key)
                for key in metadata_keys
                if eccodes.codes_is_defined(handle, key)
            }
            if eccodes.codes_get(handle, "editionNumber", int) == 2:
                inventory = describe(handle)
    finally:
        eccodes.codes_release(handle)
    return Field(values=out, grid_keys=grid, metadata=metadata, inventory=inventory)
