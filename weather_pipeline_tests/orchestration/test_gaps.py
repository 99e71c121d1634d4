"""Gap fill: plan against the mirror, dispatch as backfills, verify against materializations."""

from datetime import datetime, timezone

import pytest
from dagster import DagsterInstance, materialize

from weather_pipeline.cli import main
from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.orchestration import gaps
from weather_pipeline.orchestration.assets import grib_only
from weather_pipeline.orchestration.partitions import partition_key
from weather_pipeline.orchestration.resources import resources_from_env
from weather_pipeline.orchestration.sensors import GAP_FILL_PRIORITY
from weather_pipeline_tests.mirror_fixtures import HRRR_RUN

NOW = datetime(2026, 5, 12, 1, 30, tzinfo=timezone.utc)


@pytest.fixture()
def env(mirror, tmp_path):
    resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": mirror.url,
                                    "WEATHER_PIPELINE_CACHE": str(tmp_path / "cache")})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
    assert materialize(**grib_only(load_catalog().model("hrrr")), instance=instance, resources=resources,
                       partition_key=str(partition_key(HRRR_RUN, 1))).success
    return instance, resources


def test_plan_lists_what_the_source_has_and_we_lack(env):
    instance, resources = env
    found = gaps.plan(instance, resources["noaa"], models=["hrrr"], since="20260511_23", now=NOW)
    assert [(g.model, g.run, g.hour) for g in found] == [("hrrr", HRRR_RUN, 0), ("hrrr", HRRR_RUN, 2)]
    assert all(g.source == "mirror" for g in found)
    assert gaps.runs_between(load_catalog().model("gfs"), datetime(2026, 5, 11, 6, tzinfo=timezone.utc), NOW) == [
        "20260512_00", "20260511_18", "20260511_12", "20260511_06"]


def test_dispatch_makes_one_low_priority_backfill_per_model_run(env):
    instance, _ = env
    manifest = [gaps.Gap("hrrr", HRRR_RUN, 0), gaps.Gap("hrrr", HRRR_RUN, 2), gaps.Gap("hrrr", "20260512_01", 0)]
    ids = gaps.dispatch(instance, manifest)
    assert len(ids) == 2
    backfills = {b.backfill_id: b for b in instance.get_backfills()}
    b = backfills[ids[0]]
    assert b.tags["dagster/priority"] == str(GAP_FILL_PRIORITY) and b.tags["gap_fill"] == "true"
    assert "20260512_01" in instance.get_dynamic_partitions("hrrr_runs")
    targeted = {str(k) for k in b.asset_backfill_data.target_subset.iterate_asset_partitions()}
    assert any("000|20260512_00" in t for t in targeted) and any("002|20260512_00" in t for t in targeted)


def test_verify_reports_what_is_still_missing(env):
    instance, _ = env
    manifest = [gaps.Gap("hrrr", HRRR_RUN, 1), gaps.Gap("hrrr", HRRR_RUN, 2)]
    assert gaps.verify(instance, manifest) == [gaps.Gap("hrrr", HRRR_RUN, 2)]
    assert "hrrr 20260512_00: hours 2" == gaps.summarize(gaps.verify(instance, manifest))


def test_manifest_round_trip_and_bad_lines():
    g = gaps.Gap("gfs", "20260512_06", 123, "aws")
    assert gaps.read_manifest([g.to_json(), ""]) == [g]
    with pytest.raises(ValueError, match="manifest line 1"):
        gaps.read_manifest(['{"model": "gfs"}'])


def test_cli_verify_exit_status_and_errors(tmp_path, monkeypatch, capsys):
    import shutil
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(gaps.Gap("hrrr", HRRR_RUN, 4).to_json() + "\n")
    assert main(["gaps", "verify", str(manifest)]) == 1
    assert "1 of 1 entries still missing: hrrr 20260512_00: hours 4" in capsys.readouterr().out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["gaps", "dispatch", str(empty)]) == 0
    assert "nothing to dispatch" in capsys.readouterr().out
    assert main(["gaps", "verify", str(tmp_path / "nope.jsonl")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["gaps", "dispatch", str(bad)]) == 2
    assert "manifest line 1" in capsys.readouterr().err
    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.chdir(tmp_path)  # no ./.dagster_home here either
    assert main(["gaps", "verify", str(manifest)]) == 2
    assert "no Dagster instance: DAGSTER_HOME is not set" in capsys.readouterr().err


def test_plan_against_a_dead_source_fails_fast_naming_it(env, tmp_path, capsys, monkeypatch):
    import socket
    import time

    from weather_pipeline.core.http import reset_server_states

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    reset_server_states()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("WEATHER_PIPELINE_SOURCES", "mirror")
    monkeypatch.setenv("WEATHER_PIPELINE_MIRROR_URL", dead)
    t0 = time.monotonic()
    code = main(["gaps", "plan", "--model", "hrrr"])  # every run within retention: 48 listings
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    reset_server_states()
    assert code == 3 and elapsed < 60, (code, elapsed)
    line = next(x for x in err.splitlines() if x.startswith("weather-pipeline: error:"))
    assert "source unreachable, plan incomplete: hrrr on mirror" in line
    assert dead.split("//")[1] in line and "connection refused" in line
    assert "source has 0 h" not in err


def test_plan_does_not_list_hours_already_queued(env):
    from dagster import DagsterRun, DagsterRunStatus

    instance, resources = env
    instance.add_run(DagsterRun(job_name="hrrr_ingest_grib", run_id="queued-1", status=DagsterRunStatus.NOT_STARTED,
                                tags={"model": "hrrr", "run": HRRR_RUN, "task": "ingest_grib",
                                      "dagster/partition": str(partition_key(HRRR_RUN, 2))}))
    found = gaps.plan(instance, resources["noaa"], models=["hrrr"], since="20260511_23", now=NOW)
    assert [(g.run, g.hour) for g in found] == [(HRRR_RUN, 0)]
