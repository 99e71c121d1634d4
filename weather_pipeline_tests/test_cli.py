"""The `weather-pipeline` command line."""

from __future__ import annotations

import json

import pytest

from weather_pipeline.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for argv in (["--help"], ["demo", "--help"], ["mirror", "--help"], ["mirror", "generate", "--help"],
                 ["mirror", "serve", "--help"], ["inventory", "--help"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_inventory_json_on_a_real_idx(real_dir, capsys):
    path = real_dir / "20231104.gfs.t00z.pgrb2.0p25.f021.idx"
    assert main(["inventory", str(path), "--json", "--search", ":TMP:2 m above ground:"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry == {"msg": "581", "start": 422567101, "end": entry["end"], "variable": "TMP",
                     "level": "2 m above ground", "forecast": "21 hour fcst"}
    assert entry["end"] > entry["start"]
    assert main(["inventory", str(path), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries[-1]["end"] is None and len(entries) == 743


def test_inventory_table_and_grib_input(real_dir, capsys):
    assert main(["inventory", str(real_dir / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2")]) == 0
    out = capsys.readouterr().out
    assert "APCP:surface:0-12 hour acc fcst" in out and "APCP:surface:11-12 hour acc fcst" in out


def test_inventory_over_http(mirror, capsys):
    url = next(f"{mirror.url}/{p.relative_to(mirror.root).as_posix()}" for p in mirror.root.rglob("*.idx"))
    assert main(["inventory", url, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) > 50


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inventory", "/nonexistent.idx"], "no such file: /nonexistent.idx"),
        (["mirror", "generate", "--model", "ecmwf", "--run", "20260512_00"], "unknown model 'ecmwf'"),
        (["mirror", "generate", "--model", "hrrr", "--run", "20260512_01", "--hours", "0-30"], "forecast hour 19 is outside"),
        (["mirror", "generate", "--model", "gfs", "--run", "2026-05-12"], "malformed run key"),
    ],
)
def test_bad_input_exits_2_naming_it(argv, message, capsys, tmp_path):
    assert main(argv + (["--root", str(tmp_path)] if argv[0] == "mirror" else [])) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_inventory_of_a_non_idx_file_is_an_error(tmp_path, capsys):
    bad = tmp_path / "page.idx"
    bad.write_text("<html>Not Found</html>")
    assert main(["inventory", str(bad)]) == 2
    assert "not a wgrib2 inventory line" in capsys.readouterr().err


def test_the_instance_is_found_as_make_finds_it(tmp_path, monkeypatch, capsys):
    from weather_pipeline.cli import UsageError, find_dagster_home

    (tmp_path / ".dagster_home").mkdir()
    assert find_dagster_home({}, tmp_path) == (tmp_path / ".dagster_home", find_dagster_home({}, tmp_path)[1])
    assert "./.dagster_home" in find_dagster_home({}, tmp_path)[1]
    assert find_dagster_home({"DAGSTER_HOME": "/x"}, tmp_path)[0].as_posix() == "/x"
    with pytest.raises(UsageError, match="no Dagster instance"):
        find_dagster_home({}, tmp_path / "elsewhere")
    # the status command says which one it used
    monkeypatch.setenv("DAGSTER_HOME", "recorded, so that teardown removes what the command sets")
    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WEATHER_PIPELINE_CACHE", str(tmp_path / "cache"))
    code = main(["status", "--json"])
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and f"instance: {tmp_path / '.dagster_home'} (the project's ./.dagster_home" in err
