"""Tile building on the real files and the generated mirror's cache."""

import json

import numpy as np
import pytest

from weather_pipeline.cli import main
from weather_pipeline.core.cache import CacheLayout, sidecar_path
from weather_pipeline.core.regrid import TargetGrid
from weather_pipeline.core.tiles import field_stats, tile_from_file, update_run_tile, write_tile


def test_cli_tile_reproduces_gfs_values_exactly_across_zero_longitude(real_dir, tmp_path, capsys):
    out = tmp_path / "t.npz"
    src = real_dir / "gfs.20210509.t06z.pgrb2.1p00.f000.10u.grib2"
    for method in ("bilinear", "nearest"):
        assert main(["tile", str(src), "--bbox=-5,40,5,50", "--res", "1", "--method", method, "-o", str(out)]) == 0
        with np.load(out) as z:
            data, lat, lon = z["data"], z["lat"], z["lon"]
        import eccodes

        with open(src, "rb") as fh:
            h = eccodes.codes_grib_new_from_file(fh)
        values = eccodes.codes_get_values(h).reshape(181, 360)
        eccodes.codes_release(h)
        expected = values[np.ix_((90 - lat).astype(int), np.mod(lon, 360).astype(int))].astype(np.float32)
        np.testing.assert_array_equal(data, expected)
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["message"] == "UGRD:10 m above ground:anl" and meta["method"] == "nearest"
    assert meta["winds"] is None  # GFS winds are earth-relative already
    assert "wrote" in capsys.readouterr().out


def test_cli_tile_search_picks_the_matching_message(real_dir, tmp_path):
    out = tmp_path / "acc.npz"
    src = real_dir / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2"
    assert main(["tile", str(src), "--bbox=-100,35,-95,40", "--res", "0.1", "--search", ":11-12 hour acc", "-o", str(out)]) == 0
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["message"] == "APCP:surface:11-12 hour acc fcst"
    assert meta["stats"]["nan_fraction"] == 0.0 and meta["stats"]["min"] >= 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bbox", "1,2,3", "--res", "1"], "bad bbox"),
        (["--bbox=10,40,5,50", "--res", "1"], "bbox longitudes"),
        (["--bbox=-5,40,5,50", "--res", "1", "--search", ":NOPE:"], "no message matches"),
    ],
)
def test_cli_tile_bad_input(real_dir, tmp_path, capsys, argv, message):
    src = real_dir / "gfs.20210509.t06z.pgrb2.1p00.f000.10u.grib2"
    assert main(["tile", str(src), *argv, "-o", str(tmp_path / "x.npz")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_field_stats_ignore_nan():
    stats = field_stats(np.array([[1.0, np.nan], [3.0, np.nan]], dtype=np.float32))
    assert stats == {"min": 1.0, "max": 3.0, "mean": 2.0, "nan_fraction": 0.5}
    assert field_stats(np.full((2, 2), np.nan))["min"] is None


def test_run_tile_stacks_hours_present_and_is_replaced_atomically(tmp_path):
    layout = CacheLayout(tmp_path)
    target = TargetGrid(0, 0, 2, 2, 1.0)
    for hour in (0, 1, 3):
        data = np.full(target.shape, hour, dtype=np.float32)
        data[0, 0] = np.nan
        write_tile(layout.tile_path("r", 1.0, "m", "20260101_00", "v", hour), data, target,
                   {"source_grib_md5": f"md5-{hour}", "model": "m", "variable": "v", "region": "r", "res": 1.0})
    path = update_run_tile(layout, "r", 1.0, "m", "20260101_00", "v")
    with np.load(path) as z:
        assert list(z["hours"]) == [0, 1, 3] and z["data"].shape == (3, 3, 3)
        assert np.isnan(z["data"][:, 0, 0]).all() and z["data"][2, 1, 1] == 3
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["source_grib_md5"] == {"0": "md5-0", "1": "md5-1", "3": "md5-3"}
    assert meta["stats"]["nan_fraction"] == pytest.approx(1 / 9) and meta["stats"]["max"] == 3
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    # Current: not rewritten. A changed hour: rewritten.
    mtime = path.stat().st_mtime_ns
    assert update_run_tile(layout, "r", 1.0, "m", "20260101_00", "v") == path and path.stat().st_mtime_ns == mtime
    write_tile(layout.tile_path("r", 1.0, "m", "20260101_00", "v", 1), np.full(target.shape, 7, np.float32), target,
               {"source_grib_md5": "md5-1b"})
    update_run_tile(layout, "r", 1.0, "m", "20260101_00", "v")
    with np.load(path) as z:
        assert z["data"][1, 0, 0] == 7
    assert json.loads(sidecar_path(path).read_text())["source_grib_md5"]["1"] == "md5-1b"
    assert update_run_tile(layout, "r", 1.0, "m", "20260101_02", "v") is None


def test_tile_from_a_non_grib_file_is_an_error(tmp_path):
    bad = tmp_path / "x.grib2"
    bad.write_bytes(b"<html>nope</html>")
    with pytest.raises(Exception, match="GRIB"):
        tile_from_file(bad, TargetGrid(0, 0, 1, 1, 1.0), tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()

