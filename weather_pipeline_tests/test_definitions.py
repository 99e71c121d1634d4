"""The code location loads as the daemon loads it: every job resolves, every name is as documented."""

from __future__ import annotations

from weather_pipeline.core.catalog import load_catalog


def test_every_job_resolves_and_runs_what_its_task_means():
    from weather_pipeline.definitions import defs

    models = sorted(load_catalog().models)
    names = {j.name for j in defs.jobs}
    assert names == {"prune_cache", "verify_cache"} | {f"{m}_{t}" for m in models for t in ("ingest_grib", "build_tile")}
    for name in names:
        job = defs.resolve_job_def(name)  # raises like the code server would if a selection were bad
        checks = {k.name for k in job.asset_layer.asset_graph.asset_check_keys}
        assets = {k.to_user_string() for k in job.asset_layer.asset_graph.get_all_asset_keys()
                  if job.asset_layer.asset_graph.get(k).is_executable}
        tile_checks = {"sidecar_md5_matches_grib", "values_within_physical_bounds", "nan_fraction_under_threshold"}
        if name.endswith("_ingest_grib"):
            # one run ingests and tiles; verification runs in verify_cache, not after each ingest
            model = name.removesuffix("_ingest_grib")
            assert {f"{model}_grib", f"{model}_tiles"} <= assets
            assert checks == tile_checks
        elif name.endswith("_build_tile"):
            assert checks == {"sidecar_md5_matches_grib", "values_within_physical_bounds", "nan_fraction_under_threshold"}
        elif name == "verify_cache":
            assert checks == {"gribs_match_ingest", "tiles_match_sidecars"}
    assert {s.name for s in defs.sensors} == {"deep_status"} | {f"{m}_{k}" for m in models
                                                                for k in ("scan_source", "tiles_follow_gribs")}
    assert {s.name for s in defs.schedules} == {"prune_cache_schedule", "verify_cache_schedule"}
