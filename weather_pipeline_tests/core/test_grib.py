"""Tests of weather_pipeline.core.grib on real NOAA files and on deliberately broken bytes."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

import weather_pipeline  # noqa: F401  (pyproj before eccodes)
import eccodes

from weather_pipeline.core import grib
from weather_pipeline.core.grib import GribError, StatisticalRange

from weather_pipeline_tests.testdata import REAL_DIR as REAL  # noqa: E402
HRRR_APCP = REAL / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2"
GFS_10U = REAL / "gfs.20210509.t06z.pgrb2.1p00.f000.10u.grib2"
GFS_APTMP = REAL / "gfs.20210509.t06z.pgrb2.1p00.f000.aptmp.grib2"
REAL_INDEXES = sorted(REAL.glob("*.idx"))


# The HRRR subset: message 1 (0-12 h APCP) is 887243 bytes, then one stray byte, then message 2
# (and one more stray byte at the end of the file).
FIRST_LENGTH = 887243
SECOND_OFFSET = 887244
SECOND_LENGTH = 644938


@pytest.fixture(scope="module")
def hrrr() -> bytes:
    return HRRR_APCP.read_bytes()


def _first(data: bytes) -> bytes:
    return data[:FIRST_LENGTH]


def _second(data: bytes) -> bytes:
    return data[SECOND_OFFSET : SECOND_OFFSET + SECOND_LENGTH]


def _sections(message: bytes) -> dict[int, grib.Section]:
    return {s.number: s for s in grib.grib2_sections(message)}


# ------------------------------------------------------------------------------------------
# Framing
# ------------------------------------------------------------------------------------------


def test_frames_real_hrrr_subset_across_its_stray_byte(hrrr: bytes) -> None:
    spans = grib.iter_message_spans(hrrr, source="hrrr")
    assert spans == [
        grib.MessageSpan(0, FIRST_LENGTH, 2),
        grib.MessageSpan(SECOND_OFFSET, SECOND_LENGTH, 2),
    ]
    # the stray bytes: one between the messages and one more after the last
    assert hrrr[FIRST_LENGTH : FIRST_LENGTH + 1] == b"G"
    assert hrrr[spans[1].end :] == b"G"


def test_frames_memoryview_without_copying_semantics(hrrr: bytes) -> None:
    assert grib.iter_message_spans(memoryview(hrrr)) == grib.iter_message_spans(hrrr)


def test_empty_data_is_reported() -> None:
    with pytest.raises(GribError, match=r"src: empty data"):
        grib.iter_message_spans(b"", source="src")


def test_html_error_page_is_reported_with_its_start() -> None:
    page = b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>"
    with pytest.raises(GribError, match=r"page\.grib2: no GRIB marker in \d+ bytes.*DOCTYPE"):
        grib.iter_message_spans(page, source="page.grib2")


def test_truncated_message_names_offset_claimed_and_remaining(hrrr: bytes) -> None:
    cut = hrrr[:-1000]
    remaining = len(cut) - SECOND_OFFSET
    with pytest.raises(
        GribError,
        match=rf"f\.grib2: message at byte {SECOND_OFFSET} claims {SECOND_LENGTH} bytes "
        rf"but only {remaining} remain",
    ):
        grib.iter_message_spans(cut, source="f.grib2")


def test_missing_end_marker_is_reported(hrrr: bytes) -> None:
    broken = bytearray(hrrr)
    broken[FIRST_LENGTH - 4 : FIRST_LENGTH] = b"\0\0\0\0"
    with pytest.raises(GribError, match=r"message at byte 0 \(887243 bytes\) does not end with '7777'"):
        grib.iter_message_spans(bytes(broken))


def test_junk_between_messages_is_reported_with_its_offset(hrrr: bytes) -> None:
    first, second = _first(hrrr), _second(hrrr)
    junk = b"x" * (grib.MAX_PADDING + 1)
    with pytest.raises(GribError, match=rf"{len(junk)} unexpected bytes at byte {FIRST_LENGTH} between"):
        grib.iter_message_spans(first + junk + second)


def test_short_padding_between_and_after_messages_is_tolerated(hrrr: bytes) -> None:
    first, second = _first(hrrr), _second(hrrr)
    padded = first + b"\0" * grib.MAX_PADDING + second + b"\n\n"
    assert [s.length for s in grib.iter_message_spans(padded)] == [FIRST_LENGTH, SECOND_LENGTH]


def test_junk_before_first_message_or_after_last_is_reported(hrrr: bytes) -> None:
    with pytest.raises(GribError, match=r"3 unexpected bytes at byte 0 before the first GRIB message"):
        grib.iter_message_spans(b"abc" + hrrr)
    tail = b"<html>gateway timeout</html>"
    with pytest.raises(GribError, match=rf"{len(tail)} bytes after the last GRIB message"):
        grib.iter_message_spans(_first(hrrr) + tail)


def test_grib1_messages_are_framed_and_verified() -> None:
    handle = eccodes.codes_grib_new_from_samples("GRIB1")
    try:
        message = eccodes.codes_get_message(handle)
    finally:
        eccodes.codes_release(handle)
    spans = grib.iter_message_spans(message + message)
    assert [(s.offset, s.length, s.edition) for s in spans] == [
        (0, len(message), 1),
        (len(message), len(message), 1),
    ]
    assert grib.verify_messages(message + message, source="grib1", expected=2) == 2


# ------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------


def test_real_files_verify(hrrr: bytes) -> None:
    assert grib.verify_messages(hrrr, source="hrrr", expected=2, valid_range=(0, 2000)) == 2
    assert grib.verify_messages(GFS_10U.read_bytes(), source="gfs") == 1
    assert grib.verify_messages(GFS_APTMP.read_bytes(), source="gfs", expected=1) == 1


def test_wrong_message_count_is_rejected(hrrr: bytes) -> None:
    with pytest.raises(GribError, match=r"expected 3 GRIB messages, found 2"):
        grib.verify_messages(hrrr, source="hrrr", expected=3)


@pytest.mark.parametrize(
    "body, pattern",
    [
        (b"", r"empty data"),
        (b"<html><body>404 Not Found</body></html>", r"no GRIB marker"),
    ],
)
def test_non_grib_bodies_are_rejected(body: bytes, pattern: str) -> None:
    with pytest.raises(GribError, match=pattern):
        grib.verify_messages(body, source="range")


def test_truncated_body_is_rejected(hrrr: bytes) -> None:
    with pytest.raises(GribError, match=r"claims 887243 bytes but only 500000 remain"):
        grib.verify_messages(hrrr[:500000], source="range", expected=1)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.9, 0.99])
def test_zeroed_data_bytes_decode_silently_but_fail_the_value_range(hrrr: bytes, fraction: float) -> None:
    # What really catches a damaged data section: GRIB2 has no checksum and eccodes decodes the
    # zeroed bytes without complaint (lengths and the section chain are untouched), but NOAA's
    # second-order spatial differencing integrates the error into every later value, which
    # lands far outside the physical range of the variable.
    message = hrrr[:FIRST_LENGTH]
    data_section = _sections(message)[7]
    start = data_section.offset + 5 + int((data_section.length - 5) * fraction)
    broken = bytearray(message)
    broken[start : start + 16] = bytes(16)
    broken = bytes(broken)
    assert broken != message
    assert grib.verify_messages(broken, source="range", expected=1) == 1  # structurally fine
    original = grib.read_field(message).values
    damaged = grib.read_field(broken).values
    assert not np.array_equal(original, damaged)
    with pytest.raises(GribError, match=r"outside the plausible range \[0, 2000\]"):
        grib.verify_messages(broken, source="range", expected=1, valid_range=(0.0, 2000.0))


def test_corrupted_section_header_breaks_the_section_chain(hrrr: bytes) -> None:
    message = bytearray(hrrr[:FIRST_LENGTH])
    grid = _sections(bytes(message))[3]
    message[grid.offset : grid.offset + 16] = bytes(16)  # section 3 length and number zeroed
    with pytest.raises(GribError, match=r"found section 0 at byte 37 after section 1"):
        grib.verify_messages(bytes(message), source="range")


def test_section_lengths_must_add_up_to_the_total(hrrr: bytes) -> None:
    message = bytearray(hrrr[:FIRST_LENGTH])
    data_section = _sections(bytes(message))[7]
    message[data_section.offset : data_section.offset + 4] = (data_section.length + 8).to_bytes(4, "big")
    with pytest.raises(GribError, match=r"section lengths do not add up to the total length 887243"):
        grib.verify_messages(bytes(message), source="range")


def test_total_length_field_disagreeing_with_framing_is_caught(hrrr: bytes) -> None:
    # A message whose section 0 length points exactly at a later '7777' still frames, so the
    # section chain has to catch it.
    first = bytearray(hrrr[:FIRST_LENGTH])
    doubled = bytes(first) + bytes(first)
    bogus = bytearray(doubled)
    bogus[8:16] = len(doubled).to_bytes(8, "big")
    with pytest.raises(GribError, match=r"found section \d+ at byte 887239 after section 7"):
        grib.verify_messages(bytes(bogus), source="range")


# ------------------------------------------------------------------------------------------
# wgrib2 naming
# ------------------------------------------------------------------------------------------


def _describe_all(data: bytes) -> list[str]:
    out = []
    for span in grib.iter_message_spans(data):
        handle = eccodes.codes_new_from_message(data[span.offset : span.end])
        try:
            out.append(str(grib.describe(handle)))
        finally:
            eccodes.codes_release(handle)
    return out


def test_describe_real_files(hrrr: bytes) -> None:
    assert _describe_all(hrrr) == [
        "APCP:surface:0-12 hour acc fcst",
        "APCP:surface:11-12 hour acc fcst",
    ]
    assert _describe_all(GFS_10U.read_bytes()) == ["UGRD:10 m above ground:anl"]
    # eccodes reads 0/0/21 "Apparent temperature" at 103 (height above ground) 2 m, f000:
    # a WMO parameter wgrib2 (and NCEP's tables) abbreviate APTMP.
    assert _describe_all(GFS_APTMP.read_bytes()) == ["APTMP:2 m above ground:anl"]


@pytest.mark.parametrize(
    "unit, start, statistics, expected",
    [
        (1, 0, None, "anl"),
        (1, 5, None, "5 hour fcst"),
        (1, 24, None, "24 hour fcst"),
        (0, 15, None, "15 min fcst"),
        (1, 0, StatisticalRange(1, 2, 1, 5), "0-5 hour acc fcst"),
        (1, 4, StatisticalRange(1, 2, 1, 1), "4-5 hour acc fcst"),
        (1, 4, StatisticalRange(2, 2, 1, 1), "4-5 hour max fcst"),
        (1, 18, StatisticalRange(0, 2, 1, 3), "18-21 hour ave fcst"),
        (1, 0, StatisticalRange(1, 2, 1, 0), "0-0 day acc fcst"),  # HRRR f00 APCP
        (1, 0, StatisticalRange(1, 2, 1, 24), "0-1 day acc fcst"),
        (1, 18, StatisticalRange(3, 2, 1, 3), "18-21 hour min fcst"),
    ],
)
def test_format_forecast(unit: int, start: int, statistics: StatisticalRange | None, expected: str) -> None:
    assert grib.format_forecast(unit, start, statistics) == expected


def test_unknown_parameters_use_wgrib2_fallback_forms() -> None:
    assert (
        grib.parameter_name(0, 16, 201, centre=7, local_table=1)
        == "var discipline=0 center=7 local_table=1 parmcat=16 parm=201"
    )
    assert grib.parameter_name(0, 0, 99, master_table=2) == "var discipline=0 master_table=2 parmcat=0 parm=99"
    # NCEP local names apply to NCEP only
    assert grib.parameter_name(0, 3, 198, centre=7) == "MSLMA"
    assert grib.parameter_name(0, 3, 198, centre=98).startswith("var discipline=0 center=98")


@pytest.mark.parametrize(
    "level, surfaces",
    [
        ("2 m above ground", (103, 0, 2, 255, 0, 0)),
        ("surface", (1, 0, 0, 255, 0, 0)),
        ("500 mb", (100, 0, 50000, 255, 0, 0)),
        ("0.01 mb", (100, 0, 1, 255, 0, 0)),
        ("0-500 m above ground", (103, 0, 0, 103, 0, 500)),
        ("100-1000 mb above ground", (108, 0, 10000, 108, 0, 100000)),
        ("0.995 sigma level", (104, 3, 995, 255, 0, 0)),
        ("PV=-2e-06 (Km^2/kg/s) surface", (109, 6, -2, 255, 0, 0)),
        ("261 K level - 256 K level", (20, 0, 261, 20, 0, 256)),
        ("entire atmosphere (considered as a single layer)", (200, 0, 0, 255, 0, 0)),
        ("cloud top", (3, 0, 0, 255, 0, 0)),
    ],
)
def test_levels_encode_and_print_back(level: str, surfaces: tuple[int, ...]) -> None:
    encoded = grib.encode_level(level)
    assert (
        encoded.type1, encoded.factor1, encoded.value1, encoded.type2, encoded.factor2, encoded.value2
    ) == surfaces
    assert grib.format_level(encoded.type1, *encoded.values()[:1], encoded.type2, encoded.values()[1]) == level


def test_unknown_level_text_is_rejected() -> None:
    with pytest.raises(ValueError, match="no GRIB2 fixed surfaces"):
        grib.encode_level("somewhere over the rainbow")


def test_every_name_and_level_of_the_real_inventories_round_trips() -> None:
    seen = 0
    for path in REAL_INDEXES:
        for line in path.read_text().splitlines():
            variable, level = line.split(":")[3:5]
            codes = grib.parameter_codes(variable)
            assert grib.parameter_name(*codes, centre=7, master_table=2, local_table=1) == variable
            surfaces = grib.encode_level(level)  # raises unless it prints back identically
            assert grib.format_level(surfaces.type1, surfaces.values()[0], surfaces.type2, surfaces.values()[1]) == level
            seen += 1
    assert seen == 170 + 173 + 696 + 743


def test_negative_level_values_survive_an_eccodes_round_trip() -> None:
    # eccodes stores the scaled value unsigned; GRIB2 (and wgrib2) read sign and magnitude.
    handle = eccodes.codes_grib_new_from_samples("GRIB2")
    try:
        eccodes.codes_set(handle, "centre", 7)
        for key, value in grib.encode_level("PV=-2e-06 (Km^2/kg/s) surface").eccodes_keys().items():
            eccodes.codes_set(handle, key, value)
        clone = eccodes.codes_new_from_message(eccodes.codes_get_message(handle))
        try:
            assert grib.describe(clone).level == "PV=-2e-06 (Km^2/kg/s) surface"
        finally:
            eccodes.codes_release(clone)
    finally:
        eccodes.codes_release(handle)


# ------------------------------------------------------------------------------------------
# Inventories
# ------------------------------------------------------------------------------------------


def test_build_index_of_real_hrrr_subset(hrrr: bytes) -> None:
    assert grib.build_index(hrrr) == (
        "1:0:d=2020121400:APCP:surface:0-12 hour acc fcst:\n"
        f"{2}:{SECOND_OFFSET}:d=2020121400:APCP:surface:11-12 hour acc fcst:\n"
    )
    run = datetime(2020, 12, 14, 0, tzinfo=timezone.utc)
    assert grib.build_index(hrrr, run_time=run).count("\n") == 2
    with pytest.raises(GribError, match=r"reference time 2020-12-14 00:00Z, not the run 2020-12-14 06:00Z"):
        grib.build_index(hrrr, run_time=datetime(2020, 12, 14, 6))


def _multi_field_message(hrrr: bytes) -> bytes:
    """Message 1 with sections 4-7 of message 2 appended: one message, two fields."""
    first, second = _first(hrrr), _second(hrrr)
    s2 = _sections(second)
    extra = second[s2[4].offset : s2[7].end]
    body = first[16:-4] + extra
    return first[:8] + (16 + len(body) + 4).to_bytes(8, "big") + body + b"7777"


def test_multi_field_messages_are_numbered_like_wgrib2(hrrr: bytes, tmp_path: Path) -> None:
    multi = _multi_field_message(hrrr)
    data = GFS_10U.read_bytes() + multi
    offset = len(GFS_10U.read_bytes())
    assert grib.build_index(data) == (
        "1:0:d=2021050906:UGRD:10 m above ground:anl:\n"
        f"2.1:{offset}:d=2020121400:APCP:surface:0-12 hour acc fcst:\n"
        f"2.2:{offset}:d=2020121400:APCP:surface:11-12 hour acc fcst:\n"
    )
    assert grib.verify_messages(data, source="multi", expected=2) == 2
    # eccodes' own multi-field reader sees the same two fields
    path = tmp_path / "multi.grib2"
    path.write_bytes(multi)
    eccodes.codes_grib_multi_support_on()
    try:
        steps = []
        with open(path, "rb") as handle_file:
            while (handle := eccodes.codes_grib_new_from_file(handle_file)) is not None:
                steps.append(eccodes.codes_get(handle, "stepRange"))
                eccodes.codes_release(handle)
    finally:
        eccodes.codes_grib_multi_support_off()
    assert steps == ["0-12", "11-12"]
    second_field = grib.read_field(data, index=2)
    assert np.array_equal(second_field.values, grib.read_field(hrrr, index=1).values)


# ------------------------------------------------------------------------------------------
# Reading values
# ------------------------------------------------------------------------------------------


def test_read_field_hrrr(hrrr: bytes) -> None:
    field = grib.read_field(HRRR_APCP, index=1)
    assert field.values.dtype == np.float32
    assert field.shape == (1059, 1799)
    assert field.grid_keys["gridType"] == "lambert"
    assert field.grid_keys["LoVInDegrees"] == 262.5
    assert field.grid_keys["scanningMode"] == 64
    assert field.grid_keys["uvRelativeToGrid"] == 1
    assert field.grid_keys["radius"] == 6371229
    assert field.metadata["stepRange"] == "11-12"
    assert str(field.inventory) == "APCP:surface:11-12 hour acc fcst"
    total = grib.read_field(hrrr, index=0).values
    assert np.nanmin(total) >= 0 and np.nanmax(total) > 10
    # the 0-12 h total covers its last hour, up to NOAA's rounding (0.01 vs 0.001 kg m-2)
    assert (total >= field.values - 0.006).all()


def test_read_field_gfs() -> None:
    field = grib.read_field(GFS_10U)
    assert field.shape == (181, 360)
    assert field.grid_keys["gridType"] == "regular_ll"
    assert field.grid_keys["latitudeOfFirstGridPointInDegrees"] == 90.0
    assert field.grid_keys["iDirectionIncrementInDegrees"] == 1.0
    assert -60 < float(np.nanmin(field.values)) < 0 < float(np.nanmax(field.values)) < 60
    assert field.metadata["shortName"] == "10u"


def test_read_field_index_out_of_range(hrrr: bytes) -> None:
    with pytest.raises(IndexError, match="holds 2 fields; there is no field 2"):
        grib.read_field(hrrr, index=2)


def test_bitmapped_points_read_as_nan_and_are_ignored_by_the_range_check() -> None:
    source = eccodes.codes_new_from_message(GFS_10U.read_bytes())
    try:
        values = eccodes.codes_get_values(source)
        masked = np.zeros(values.shape, dtype=bool)
        masked[::7] = True
        eccodes.codes_set(source, "bitmapPresent", 1)
        eccodes.codes_set(source, "missingValue", 9999.0)
        eccodes.codes_set_values(source, np.where(masked, 9999.0, values))
        message = eccodes.codes_get_message(source)
    finally:
        eccodes.codes_release(source)
    field = grib.read_field(message)
    assert np.isnan(field.values).sum() == masked.sum()
    assert np.isnan(field.values.ravel()[masked]).all()
    assert grib.verify_messages(message, source="bitmap", valid_range=(-100.0, 100.0)) == 1
