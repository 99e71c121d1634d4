"""The .idx parser, search and range planner, on real NOAA inventories."""

import pytest

from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.core.idx import ByteRange, IdxError, find_one, parse_idx, ranges_for, search


@pytest.fixture(scope="module")
def hrrr_f05(real_dir):
    return parse_idx((real_dir / "20231104.hrrr.t01z.wrfsfcf05.grib2.idx").read_text())


@pytest.fixture(scope="module")
def gfs_f021(real_dir):
    return parse_idx((real_dir / "20231104.gfs.t00z.pgrb2.0p25.f021.idx").read_text())


def test_parses_every_real_line(real_dir):
    for path in sorted(real_dir.glob("*.idx")):
        text = path.read_text()
        entries = parse_idx(text, source=path.name)
        assert len(entries) == len(text.strip().splitlines())
        # Ends are one byte before the next start; the last is open-ended.
        for a, b in zip(entries, entries[1:]):
            assert a.end == b.start - 1
        assert entries[-1].end is None


def test_fields_of_a_known_line(hrrr_f05):
    e = next(e for e in hrrr_f05 if e.msg == "71")
    assert (e.start, e.date, e.variable, e.level, e.forecast) == (
        44599509, "2023110401", "TMP", "2 m above ground", "5 hour fcst"
    )
    assert e.end == next(x for x in hrrr_f05 if x.msg == "72").start - 1


def test_unknown_parameters_keep_wgrib2_var_form(hrrr_f05):
    e = next(e for e in hrrr_f05 if e.msg == "3")
    assert e.variable == "var discipline=0 center=7 local_table=1 parmcat=16 parm=201"
    assert e.level == "entire atmosphere"


def test_every_forecast_string_form_parses(real_dir):
    forecasts = set()
    for path in real_dir.glob("*.idx"):
        forecasts |= {e.forecast for e in parse_idx(path.read_text())}
    for form in ("anl", "5 hour fcst", "0-5 hour acc fcst", "4-5 hour acc fcst", "0-0 day acc fcst", "18-21 hour ave fcst"):
        assert form in forecasts


def test_anchored_pattern_avoids_the_tmp_2mb_trap(gfs_f021):
    loose = search(gfs_f021, ":TMP:2 m")
    assert {e.level for e in loose} == {"2 mb", "2 m above ground"}  # the trap is real
    hits = find_one(gfs_f021, load_catalog().model("gfs").variable("t2m").pattern)
    assert [(h.msg, h.level) for h in hits] == [("581", "2 m above ground")]


def test_run_total_precipitation_is_chosen_over_the_bucket(hrrr_f05, gfs_f021, real_dir):
    cat = load_catalog()
    assert [h.forecast for h in find_one(hrrr_f05, cat.model("hrrr").variable("apcp").pattern)] == ["0-5 hour acc fcst"]
    assert [h.forecast for h in find_one(gfs_f021, cat.model("gfs").variable("apcp").pattern)] == ["0-21 hour acc fcst"]
    f00 = parse_idx((real_dir / "20231104.hrrr.t01z.wrfsfcf00.grib2.idx").read_text())
    assert [h.forecast for h in find_one(f00, cat.model("hrrr").variable("apcp").pattern)] == ["0-0 day acc fcst"]


def test_every_default_variable_matches_exactly_one_field(real_dir):
    cat = load_catalog()
    files = {
        "hrrr": {"20231104.hrrr.t01z.wrfsfcf00.grib2.idx": 0, "20231104.hrrr.t01z.wrfsfcf05.grib2.idx": 5},
        "gfs": {"20231104.gfs.t00z.pgrb2.0p25.f000.idx": 0, "20231104.gfs.t00z.pgrb2.0p25.f021.idx": 21},
    }
    for model_name, names in files.items():
        model = cat.model(model_name)
        for name, hour in names.items():
            entries = parse_idx((real_dir / name).read_text())
            for var in model.default_variables:
                if var.present_at(hour):
                    assert len(find_one(entries, var.pattern)) == 1, (name, var.name)
                else:
                    assert not search(entries, var.pattern), (name, var.name)


def test_ambiguous_pattern_is_an_error(hrrr_f05):
    with pytest.raises(IdxError, match="matches different fields"):
        find_one(hrrr_f05, ":APCP:surface:")
    with pytest.raises(IdxError, match="no message matches"):
        find_one(hrrr_f05, ":NOPE:")


def test_identical_duplicates_take_the_first():
    text = (
        "1:0:d=2023110401:REFC:entire atmosphere:1 hour fcst:\n"
        "2:100:d=2023110401:APCP:surface:0-1 hour acc fcst:\n"
        "3:200:d=2023110401:APCP:surface:0-1 hour acc fcst:\n"
        "4:300:d=2023110401:TMP:surface:1 hour fcst:\n"
    )
    hits = find_one(parse_idx(text), ":APCP:surface:0-[0-9]+ hour acc fcst:")
    assert [(h.msg, h.start, h.end) for h in hits] == [("2", 100, 199)]


def test_submessages_share_a_range():
    # Constructed from the wgrib2 submessage convention (12.1 and 12.2 share an offset).
    text = (
        "11:1000:d=2021050906:TMP:10 m above ground:anl:\n"
        "12.1:2000:d=2021050906:UGRD:10 m above ground:anl:\n"
        "12.2:2000:d=2021050906:VGRD:10 m above ground:anl:\n"
        "13:3500:d=2021050906:PRES:surface:anl:\n"
    )
    entries = parse_idx(text)
    u, v = entries[1], entries[2]
    assert (u.start, u.end) == (v.start, v.end) == (2000, 3499)
    assert ranges_for([u, v]) == [ByteRange(2000, 3499)]


def test_adjacent_ranges_merge_and_gaps_do_not(hrrr_f05):
    by_msg = {e.msg: e for e in hrrr_f05}
    u, v, t = by_msg["77"], by_msg["78"], by_msg["71"]
    assert ranges_for([v, u, t]) == [ByteRange(t.start, t.end), ByteRange(u.start, v.end)]
    last = hrrr_f05[-1]
    assert ranges_for([last]) == [ByteRange(last.start, None)]
    assert ranges_for([last])[0].header == f"bytes={last.start}-"
    assert ByteRange(10, 19).header == "bytes=10-19"


def test_file_size_closes_the_last_range():
    entries = parse_idx("1:0:d=2023110401:TMP:surface:anl:\n2:50:d=2023110401:RH:surface:anl:\n", file_size=80)
    assert entries[-1].end == 79


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("<html><body>Not Found</body></html>\n", "not a wgrib2 inventory line"),
        ("1:0:d=2023110401:TMP\n", "lacks VAR:LEVEL:FORECAST"),
        ("1:500:d=2023110401:TMP:surface:anl:\n2:100:d=2023110401:RH:surface:anl:\n", "before the previous"),
    ],
)
def test_malformed_inventories_are_rejected(text, message):
    with pytest.raises(IdxError, match=message):
        parse_idx(text, source="x.idx")
