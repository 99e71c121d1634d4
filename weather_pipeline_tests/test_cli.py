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


def _fresh(argv: list[str], tmp_path=None) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter: exit status, stderr, and whether Dagster got imported."""
    import subprocess
    import sys

    code = ("import sys; from weather_pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('DAGSTER' if 'dagster' in sys.modules else 'NO-DAGSTER'); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    return done.returncode, done.stderr, "NO-DAGSTER" not in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["gaps", "plan", "--since", "yesterday"], "malformed run key 'yesterday'"),
    (["gaps", "plan", "--model", "ecmwf"], "unknown model 'ecmwf'"),
    (["gaps", "verify", "/nonexistent.jsonl"], "no such manifest"),
    (["status"], "no Dagster instance"),
])
def test_argument_errors_answer_before_dagster_is_imported(argv, message, tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    code, err, imported = _fresh(argv, tmp_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not imported


def test_bad_regular_expressions_are_one_line_errors(real_dir, capsys, tmp_path):
    assert main(["inventory", str(real_dir / "20231104.gfs.t00z.pgrb2.0p25.f021.idx"), "--search", "["]) == 2
    assert "--search '[' is not a valid regular expression" in capsys.readouterr().err
    grib = real_dir / "gfs.20210509.t06z.pgrb2.1p00.f000.10u.grib2"
    assert main(["tile", str(grib), "--bbox", "1,1,2,2", "--res", "1", "--search", "(", "-o", str(tmp_path / "t.npz")]) == 2
    assert "--search '(' is not a valid regular expression" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def test_a_western_bbox_needs_no_equals_sign_and_a_box_off_the_grid_is_refused(real_dir, capsys, tmp_path):
    hrrr = real_dir / "hrrr.20201214.t00z.wrfsfcf12.apcp-subset.grib2"
    out = tmp_path / "t.npz"
    assert main(["tile", str(hrrr), "--bbox", "-100,35,-95,40", "--res", "0.25", "-o", str(out)]) == 0
    assert out.is_file()
    off = tmp_path / "off.npz"
    assert main(["tile", str(hrrr), "--bbox", "10,10,12,12", "--res", "0.25", "-o", str(off)]) == 2
    assert "outside the grid" in capsys.readouterr().err and not off.exists()
    assert main(["tile", str(hrrr), "--bbox", "10,10,12,12", "--res", "0.25", "--allow-empty", "-o", str(off)]) == 0
    assert off.is_file()


def test_busy_ports_are_one_line_errors(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        (tmp_path / "mirror").mkdir()
        assert main(["mirror", "serve", "--root", str(tmp_path / "mirror"), "--port", port]) == 2
        assert f"cannot serve the mirror on 127.0.0.1:{port}" in capsys.readouterr().err
        assert main(["serve-status", "--port", port]) == 2
        err = capsys.readouterr()
        assert f"cannot serve the status page on 127.0.0.1:{port}" in err.err and "serving" not in err.out


def test_a_closed_pipe_is_not_a_traceback(real_dir):
    import subprocess
    import sys

    cmd = (f"{sys.executable} -m weather_pipeline.cli inventory "
           f"{real_dir / '20231104.gfs.t00z.pgrb2.0p25.f021.idx'} | head -n 1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 1
