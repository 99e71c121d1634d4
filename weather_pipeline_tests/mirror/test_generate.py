"""Tests of the synthetic NOAA mirror: file names, inventories, grids, values, determinism."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import weather_pipeline  # noqa: F401  (pyproj before eccodes)
import eccodes

from weather_pipeline.core import grib
from weather_pipeline.core.catalog import InvalidRequest, load_catalog
from weather_pipeline.mirror import generate
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path, plan_hour

from weather_pipeline_tests.testdata import REAL_DIR as REAL  # noqa: E402
REAL_HRRR = REAL / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2"
#: Runs of the real NOAA inventories, so generated .idx files can be compared line by line.
RUNS = {"hrrr": ("20231104_01", [0, 4, 5]), "gfs": ("20231104_00", [0, 21])}
REAL_INDEX = {
    ("hrrr", 0): REAL / "20231104.hrrr.t01z.wrfsfcf00.grib2.idx",
    ("hrrr", 5): REAL / "20231104.hrrr.t01z.wrfsfcf05.grib2.idx",
    ("gfs", 0): REAL / "20231104.gfs.t00z.pgrb2.0p25.f000.idx",
    ("gfs", 21): REAL / "20231104.gfs.t00z.pgrb2.0p25.f021.idx",
}
SEED = 7
IDX_LINE = re.compile(r"^(\d+(?:\.\d+)?):(\d+):d=(\d{10}):([^:]+):([^:]+):([^:]+):$")


@dataclass(frozen=True)
class IdxLine:
    number: str
    start: int
    date: str
    variable: str
    level: str
    forecast: str

    @property
    def text(self) -> str:
        return f"{self.number}:{self.start}:d={self.date}:{self.variable}:{self.level}:{self.forecast}:"


def parse_idx(text: str) -> list[IdxLine]:
    lines = []
    for raw in text.splitlines():
        match = IDX_LINE.match(raw)
        assert match, f"malformed .idx line {raw!r}"
        number, start, date, variable, level, forecast = match.groups()
        lines.append(IdxLine(number, int(start), date, variable, level, forecast))
    return lines


@dataclass(frozen=True)
class Mirror:
    root: Path
    written: dict[str, list[Path]]

    def path(self, model: str, hour: int) -> Path:
        return self.root / mirror_relative_path(model, RUNS[model][0], hour)

    def data(self, model: str, hour: int) -> bytes:
        return self.path(model, hour).read_bytes()

    def index(self, model: str, hour: int) -> list[IdxLine]:
        return parse_idx(Path(f"{self.path(model, hour)}.idx").read_text())

    def message(self, model: str, hour: int, pattern: str) -> bytes:
        """The bytes of the one message whose .idx line matches, cut as a downloader would."""
        data, lines = self.data(model, hour), self.index(model, hour)
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line.text)]
        assert len(hits) == 1, (pattern, [lines[i].text for i in hits])
        start = lines[hits[0]].start
        later = [line.start for line in lines if line.start > start]
        return data[start : later[0] if later else len(data)]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    # Full-size files (~80 MB per HRRR hour, ~150 MB per GFS hour): generated once per module
    # and removed afterwards rather than left to pytest's retention of old temp dirs.
    root = tmp_path_factory.mktemp("mirror")
    written = {
        model: generate_run(root, model, run, hours, seed=SEED) for model, (run, hours) in RUNS.items()
    }
    yield Mirror(root, written)
    shutil.rmtree(root, ignore_errors=True)


def _hours() -> list[tuple[str, int]]:
    return [(model, hour) for model, (_run, hours) in RUNS.items() for hour in hours]


# ------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------


def test_mirror_relative_paths_are_bucket_plus_noaa_path() -> None:
    assert (
        mirror_relative_path("hrrr", "20231104_01", 5)
        == "noaa-hrrr-bdp-pds/hrrr.20231104/conus/hrrr.t01z.wrfsfcf05.grib2"
    )
    assert (
        mirror_relative_path("gfs", "20231104_00", 21)
        == "noaa-gfs-bdp-pds/gfs.20231104/00/atmos/gfs.t00z.pgrb2.0p25.f021"
    )


def test_files_land_at_noaa_names_with_their_idx(mirror: Mirror) -> None:
    for model, (run, hours) in RUNS.items():
        expected = []
        for hour in hours:
            path = mirror.root / mirror_relative_path(model, run, hour)
            expected += [path, path.with_name(path.name + ".idx")]
        assert mirror.written[model] == expected
        assert all(p.is_file() and p.stat().st_size > 0 for p in expected)
    # the catalog's mirror URL template resolves below the root
    model = load_catalog().model("hrrr")
    url = model.url("mirror", "20231104_01", 5, mirror_url="http://localhost:8000")
    assert url.removeprefix("http://localhost:8000/") == mirror_relative_path("hrrr", "20231104_01", 5)
    assert not list(mirror.root.rglob("*.tmp")), "temporary files left behind"


def test_invalid_hour_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="forecast hour 19"):
        generate_run(tmp_path, "hrrr", "20231104_01", [19])  # 01z runs stop at 18 h
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------
# Inventories
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, hour", _hours())
def test_idx_parses_and_points_at_every_grib_message(mirror: Mirror, model: str, hour: int) -> None:
    data, lines = mirror.data(model, hour), mirror.index(model, hour)
    run = RUNS[model][0]
    assert [line.number for line in lines] == [str(n) for n in range(1, len(lines) + 1)]
    assert all(line.date == run.replace("_", "") for line in lines)
    starts = [line.start for line in lines]
    assert starts == sorted(starts) and starts[0] == 0
    assert all(data[start : start + 4] == b"GRIB" for start in starts)
    assert starts == [span.offset for span in grib.iter_message_spans(data)]


@pytest.mark.parametrize("key", sorted(REAL_INDEX))
def test_inventories_match_noaa_line_by_line(mirror: Mirror, key: tuple[str, int]) -> None:
    real_path = REAL_INDEX[key]
    real = parse_idx(real_path.read_text())
    ours = mirror.index(*key)

    def strip(lines: list[IdxLine]) -> list[tuple[str, ...]]:
        return [(l.number, l.date, l.variable, l.level, l.forecast) for l in lines]

    assert strip(ours) == strip(real)  # every message of the real file, same order and names


@pytest.mark.parametrize("model, hour", _hours())
def test_each_default_variable_matches_exactly_one_line(mirror: Mirror, model: str, hour: int) -> None:
    lines = [line.text for line in mirror.index(model, hour)]
    for variable in load_catalog().model(model).default_variables:
        hits = [line for line in lines if variable.pattern.search(line)]
        assert len(hits) == (1 if variable.present_at(hour) else 0), (variable.name, hits)
    if model == "hrrr":
        apcp = [line for line in lines if load_catalog().model("hrrr").variable("apcp").pattern.search(line)]
        expected = "0-0 day acc fcst" if hour == 0 else f"0-{hour} hour acc fcst"
        assert apcp[0].endswith(f":APCP:surface:{expected}:")


def test_bucket_rules_follow_noaa() -> None:
    def apcp(model: str, hour: int) -> list[str]:
        return [pm.forecast for pm in plan_hour(model, hour) if pm.entry.variable == "APCP"]

    assert apcp("hrrr", 0) == ["0-0 day acc fcst"]
    assert apcp("hrrr", 24) == ["0-1 day acc fcst", "23-24 hour acc fcst"]
    # at HRRR f01 and GFS f001-f006 bucket and run total coincide: two identical lines
    assert apcp("hrrr", 1) == ["0-1 hour acc fcst", "0-1 hour acc fcst"]
    assert apcp("gfs", 0) == []
    assert apcp("gfs", 3) == ["0-3 hour acc fcst", "0-3 hour acc fcst"]
    assert apcp("gfs", 7) == ["6-7 hour acc fcst", "0-7 hour acc fcst"]
    assert apcp("gfs", 126) == ["120-126 hour acc fcst", "0-126 hour acc fcst"]


# ------------------------------------------------------------------------------------------
# Grids and values
# ------------------------------------------------------------------------------------------

EXPECTED_GRID = {
    "hrrr": {
        "gridType": "lambert", "Nx": 1799, "Ny": 1059, "LaDInDegrees": 38.5, "LoVInDegrees": 262.5,
        "Latin1InDegrees": 38.5, "Latin2InDegrees": 38.5, "DxInMetres": 3000.0, "DyInMetres": 3000.0,
        "latitudeOfFirstGridPointInDegrees": 21.138123, "longitudeOfFirstGridPointInDegrees": 237.280472,
        "scanningMode": 64, "shapeOfTheEarth": 6, "radius": 6371229, "uvRelativeToGrid": 1,
    },
    "gfs": {
        "gridType": "regular_ll", "Nx": 1440, "Ny": 721, "latitudeOfFirstGridPointInDegrees": 90.0,
        "longitudeOfFirstGridPointInDegrees": 0.0, "latitudeOfLastGridPointInDegrees": -90.0,
        "longitudeOfLastGridPointInDegrees": 359.75, "iDirectionIncrementInDegrees": 0.25,
        "jDirectionIncrementInDegrees": 0.25, "scanningMode": 0, "shapeOfTheEarth": 6,
        "uvRelativeToGrid": 0,
    },
}


@pytest.mark.parametrize("model, hour", [("hrrr", 5), ("gfs", 21)])
def test_default_variables_decode_on_the_catalog_grid_within_range(mirror: Mirror, model: str, hour: int) -> None:
    for variable in load_catalog().model(model).default_variables:
        message = mirror.message(model, hour, variable.search)
        assert grib.verify_messages(message, source=variable.name, expected=1, valid_range=variable.valid_range) == 1
        field = grib.read_field(message)
        assert {k: field.grid_keys.get(k) for k in EXPECTED_GRID[model]} == EXPECTED_GRID[model]
        assert field.grid_keys["Ny"] * field.grid_keys["Nx"] == field.values.size
        assert not np.isnan(field.values).any()
        low, high = variable.valid_range
        assert low <= float(field.values.min()) and float(field.values.max()) <= high, variable.name
        assert field.values.std() > 0, f"{variable.name} is constant"


@pytest.mark.parametrize("model, hour", [("hrrr", 5), ("gfs", 21)])
def test_default_fields_are_plausible(mirror: Mirror, model: str, hour: int) -> None:
    def values(name: str) -> np.ndarray:
        return grib.read_field(mirror.message(model, hour, load_catalog().model(model).variable(name).search)).values

    t2m = values("t2m")
    assert 255 < float(t2m.mean()) < 300 and 3 < float(t2m.std()) < 40
    wind = np.hypot(values("u10"), values("v10"))
    assert 2 < float(wind.mean()) < 15 and float(wind.max()) < 60
    mslp = values("mslp")
    assert abs(float(mslp.mean()) - 101325) < 1500 and 500 < float(mslp.std()) < 4000
    apcp = values("apcp")
    assert float((apcp == 0).mean()) > 0.5 and float(apcp.max()) > 0.5
    refc = values("refc")
    no_echo = -10.0 if model == "hrrr" else -20.0
    assert float((refc == no_echo).mean()) > 0.5 and float(refc.max()) > 20


def test_hrrr_grid_is_the_real_hrrr_grid(mirror: Mirror) -> None:
    real = REAL_HRRR.read_bytes()
    real_message = real[: grib.iter_message_spans(real)[0].length]
    ours = mirror.message("hrrr", 5, r":TMP:2 m above ground:")

    def section3(message: bytes) -> bytes:
        return next(message[s.offset : s.end] for s in grib.grib2_sections(message) if s.number == 3)

    assert section3(ours) == section3(real_message)  # byte for byte
    points = [0, 1798, 1799 * 530 + 900, 1799 * 1059 - 1]
    coords = []
    for message in (ours, real_message):
        handle = eccodes.codes_new_from_message(message)
        try:
            lat = eccodes.codes_get_array(handle, "latitudes")[points]
            lon = eccodes.codes_get_array(handle, "longitudes")[points]
        finally:
            eccodes.codes_release(handle)
        coords.append((lat, lon))
    np.testing.assert_allclose(coords[0][0], coords[1][0], atol=1e-9)
    np.testing.assert_allclose(coords[0][1], coords[1][1], atol=1e-9)
    assert coords[0][0][0] == pytest.approx(21.138123) and coords[0][1][0] == pytest.approx(237.280472)


def test_identification_section_matches_noaa() -> None:
    real = REAL_HRRR.read_bytes()
    real_section1 = next(real[s.offset : s.end] for s in grib.grib2_sections(real[:887243]) if s.number == 1)
    model = load_catalog().model("hrrr")
    with generate._Encoder(model, model.validate_run("20201214_00")) as encoder:
        assert encoder.section1 == real_section1  # NCEP centre, tables 2/1, reference time


def test_apcp_totals_never_decrease_and_buckets_are_their_differences(mirror: Mirror) -> None:
    pattern = load_catalog().model("hrrr").variable("apcp").search
    totals = {hour: grib.read_field(mirror.message("hrrr", hour, pattern)).values for hour in (0, 4, 5)}
    assert not totals[0].any()
    assert len(mirror.message("hrrr", 0, pattern)) < 1000  # constant field: a tiny message, as NOAA's
    assert (totals[4] >= totals[0]).all() and (totals[5] >= totals[4]).all()
    assert (totals[5] > totals[4]).any()
    bucket = grib.read_field(mirror.message("hrrr", 5, r":APCP:surface:4-5 hour acc fcst:")).values
    assert np.array_equal(bucket, totals[5] - totals[4])  # exact: lossless packing
    gfs_total = grib.read_field(mirror.message("gfs", 21, r":APCP:surface:0-21 hour acc fcst:")).values
    gfs_bucket = grib.read_field(mirror.message("gfs", 21, r":APCP:surface:18-21 hour acc fcst:")).values
    assert (gfs_bucket >= 0).all() and (gfs_total >= gfs_bucket).all()


@pytest.mark.parametrize("model", ["hrrr", "gfs"])
def test_run_totals_never_decrease_over_a_whole_run(model: str) -> None:
    catalog_model = load_catalog().model(model)
    run_time = catalog_model.validate_run("20231104_00")
    ctx = generate._Context(model, run_time, SEED, generate._geometry(generate._grid_key(catalog_model.grid)))
    previous = None
    for hour in range(0, 49):
        ctx.hour_cache.clear()
        total = generate._precip_total(ctx, hour)
        if previous is not None:
            assert (total >= previous).all(), hour
        previous = total
    assert previous is not None and float(previous.max()) > 5.0


def test_sea_ice_fields_carry_a_bitmap(mirror: Mirror) -> None:
    field = grib.read_field(mirror.message("gfs", 21, r":ICEC:surface:"))
    lat = np.linspace(90, -90, 721)[:, None] * np.ones((1, 1440))
    assert np.isnan(field.values[np.abs(lat) < 45]).all()
    assert not np.isnan(field.values[np.abs(lat) >= 45]).any()


def test_packing_is_lossless(mirror: Mirror) -> None:
    model = load_catalog().model("hrrr")
    run_time = model.validate_run(RUNS["hrrr"][0])
    ctx = generate._Context("hrrr", run_time, SEED, generate._geometry(generate._grid_key(model.grid)))
    planned = next(pm for pm in plan_hour("hrrr", 5) if pm.inventory == "TMP:2 m above ground:5 hour fcst")
    expected = generate._cached(ctx, "t2m", planned)
    decoded = grib.read_field(mirror.message("hrrr", 5, r":TMP:2 m above ground:")).values
    assert np.array_equal(decoded, expected.astype(np.float32))


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


def test_regenerating_with_the_same_seed_gives_identical_bytes(mirror: Mirror, tmp_path: Path) -> None:
    reports: list[str] = []
    paths = generate_run(tmp_path, "hrrr", RUNS["hrrr"][0], [4], seed=SEED, progress=reports.append)
    assert len(reports) == 1 and "f004" in reports[0]
    original = mirror.path("hrrr", 4)
    try:
        assert paths[0].read_bytes() == original.read_bytes()
        assert paths[1].read_text() == Path(f"{original}.idx").read_text()
    finally:
        for path in paths:
            path.unlink()


def test_seed_changes_the_fields() -> None:
    model = load_catalog().model("gfs")
    run_time = model.validate_run("20231104_00")
    geometry = generate._geometry(generate._grid_key(model.grid))
    planned = next(pm for pm in plan_hour("gfs", 3) if pm.inventory == "TMP:2 m above ground:3 hour fcst")
    fields = [
        generate._cached(generate._Context("gfs", run_time, seed, geometry), "t2m", planned)
        for seed in (SEED, SEED, SEED + 1)
    ]
    assert np.array_equal(fields[0], fields[1])
    assert not np.array_equal(fields[0], fields[2])
