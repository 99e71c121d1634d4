from datetime import date, datetime, timezone

import pytest

from weather_pipeline.core import catalog as catalog_mod
from weather_pipeline.core.catalog import CatalogError, InvalidRequest, load_catalog, parse_hours, parse_run_key


def test_parse_hours_ranges_and_steps():
    assert parse_hours("0-3,6,9-15/3") == (0, 1, 2, 3, 6, 9, 12, 15)
    with pytest.raises(CatalogError, match="bad hour"):
        parse_hours("5-3")


def test_forecast_hours_follow_the_real_cadence():
    cat = load_catalog()
    hrrr, gfs = cat.model("hrrr"), cat.model("gfs")
    assert hrrr.hours_for_run("20260512_06") == tuple(range(49))
    assert hrrr.hours_for_run("20260512_07") == tuple(range(19))
    assert hrrr.all_hours == tuple(range(49))
    gfs_hours = gfs.hours_for_run("20260512_12")
    assert gfs_hours[:121] == tuple(range(121))
    assert gfs_hours[121:] == tuple(range(123, 385, 3))
    assert len(gfs_hours) == 209


def test_paths_match_noaa_layout_including_the_gfs_atmos_change():
    cat = load_catalog()
    assert cat.model("hrrr").url("aws", "20230125_12", 5) == (
        "https://noaa-hrrr-bdp-pds.s3.amazonaws.com/hrrr.20230125/conus/hrrr.t12z.wrfsfcf05.grib2"
    )
    gfs = cat.model("gfs")
    assert gfs.relative_path("20230125_06", 21) == "gfs.20230125/06/atmos/gfs.t06z.pgrb2.0p25.f021"
    assert gfs.relative_path("20210322_00", 3) == "gfs.20210322/00/gfs.t00z.pgrb2.0p25.f003"
    assert gfs.url("mirror", "20230125_06", 0, mirror_url="http://127.0.0.1:9/") == (
        "http://127.0.0.1:9/noaa-gfs-bdp-pds/gfs.20230125/06/atmos/gfs.t06z.pgrb2.0p25.f000"
    )


def test_default_variables_cover_the_required_set():
    cat = load_catalog()
    for name in ("hrrr", "gfs"):
        names = {v.name for v in cat.model(name).default_variables}
        assert {"t2m", "u10", "v10", "apcp", "refc", "mslp"} <= names
    assert "gust" not in {v.name for v in cat.model("hrrr").default_variables}
    assert not cat.model("gfs").variable("apcp").present_at(0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.model("ecmwf"), "unknown model 'ecmwf'; known models: gfs, hrrr"),
        (lambda c: c.model("hrrr").variable("t3m"), "unknown variable 't3m' for model hrrr"),
        (lambda c: c.model("gfs").validate_run("20260512_03"), "gfs has no 03z run"),
        (lambda c: c.model("hrrr").validate_hour("20260512_07", 30), "forecast hour 30 is outside hrrr's range for a 07z run (0-18)"),
        (lambda c: c.model("hrrr").validate_run("2026-05-12"), "malformed run key '2026-05-12'"),
        (lambda c: c.model("hrrr").validate_run("20261312_00"), "malformed run key '20261312_00'"),
    ],
)
def test_bad_input_names_itself(call, message):
    with pytest.raises((CatalogError, InvalidRequest), match=message.replace("(", r"\(").replace(")", r"\)")):
        call(load_catalog())


def test_parse_run_key_is_utc():
    assert parse_run_key("20230125_12") == datetime(2023, 1, 25, 12, tzinfo=timezone.utc)


def test_overlay_adds_a_variable_and_a_model(tmp_path, monkeypatch):
    overlay = tmp_path / "extra.toml"
    overlay.write_text(
        '[models.hrrr.variables.vis]\nsearch = ":VIS:surface:"\nunits = "m"\n'
        '[models.hrrrak]\ntitle = "HRRR Alaska"\nrun_hours = "0-21/3"\n'
        '[[models.hrrrak.horizons]]\nrun_hours = "0-21/3"\nforecast_hours = "0-18"\n'
        '[[models.hrrrak.paths]]\ntemplate = "hrrr.{date}/alaska/hrrr.t{cycle}z.wrfsfcf{hour:02d}.ak.grib2"\n'
        '[models.hrrrak.urls]\naws = "https://noaa-hrrr-bdp-pds.s3.amazonaws.com"\n'
    )
    monkeypatch.setenv(catalog_mod.OVERLAY_ENV, str(overlay))
    cat = load_catalog()
    assert cat.model("hrrr").variable("vis").search == ":VIS:surface:"
    assert "t2m" in cat.model("hrrr").variables  # the embedded entries survive the merge
    assert cat.model("hrrrak").relative_path("20260512_03", 7) == "hrrr.20260512/alaska/hrrr.t03z.wrfsfcf07.ak.grib2"


def test_overlay_that_is_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(catalog_mod.OVERLAY_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(CatalogError, match="nope.toml"):
        load_catalog()


def test_available_since_is_a_date():
    assert load_catalog().model("hrrr").available_since["aws"] == date(2014, 7, 30)
