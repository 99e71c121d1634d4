"""Named jobs, so the runs table reads like a job table of the four task types.

| task type   | Dagster                                                               |
|-------------|-----------------------------------------------------------------------|
| ScanSource  | sensor `{model}_scan_source` (it launches `{model}_ingest_grib` runs)  |
| IngestGrib  | job `{model}_ingest_grib` (assets `{model}_grib`, then `{model}_tiles` |
|             | of each hour as it lands: one run, one process per batch)              |
| BuildTile   | job `{model}_build_tile` (asset `{model}_tiles`), launched by sensor   |
|             | `{model}_tiles_follow_gribs` for GRIBs that arrived another way, and   |
|             | for repairs                                                            |
| PruneCache  | job `prune_cache`, schedule `prune_cache_schedule`                      |

A job per model because an asset job has one partitions definition and each model has its own
run partitions. Every run carries the tags `task`, `model` and (for runs of one model run)
`run`, which the queue's concurrency limits and the deep status use.
"""

from dagster import AssetCheckKey, AssetKey, AssetSelection, define_asset_job

from weather_pipeline.core.catalog import Model
from weather_pipeline.orchestration.assets import grib_asset_name, tile_asset_name

TASK_TAG, MODEL_TAG, RUN_TAG = "task", "model", "run"
PRIORITY_TAG = "dagster/priority"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def ingest_job_name(model_name: str) -> str:
    return f"{model_name}_ingest_grib"


def tile_job_name(model_name: str) -> str:
    return f"{model_name}_build_tile"


#: the cache verification checks run in their own job (verify_cache), never after an ingest or a
#: tile build; names from orchestration/integrity.py (not imported: it imports this module's users)
_VERIFY_CHECKS = {"_grib": "gribs_match_ingest", "_tiles": "tiles_match_sidecars"}


def _without_verification(asset_name: str) -> AssetSelection:
    suffix = next(s for s in _VERIFY_CHECKS if asset_name.endswith(s))
    key = AssetKey(asset_name)
    return AssetSelection.assets(key) - AssetSelection.checks(AssetCheckKey(key, _VERIFY_CHECKS[suffix]))


def build_ingest_job(model: Model):
    """IngestGrib, and BuildTile of what it fetched, in one run (one process start per batch):
    the model's two assets are one subsettable step that tiles each hour as it lands."""
    return define_asset_job(
        ingest_job_name(model.name),
        selection=_without_verification(grib_asset_name(model.name)) | _without_verification(tile_asset_name(model.name)),
        tags={TASK_TAG: "ingest_grib", MODEL_TAG: model.name},
        description=f"IngestGrib for {model.name}: fetch forecast hours as GRIB2 subsets and tile each as it lands.",
    )


def build_tile_job(model: Model):
    return define_asset_job(
        tile_job_name(model.name),
        selection=_without_verification(tile_asset_name(model.name)),
        tags={TASK_TAG: "build_tile", MODEL_TAG: model.name},
        description=f"BuildTile for {model.name}: regional NPZ tiles from the cached GRIB subsets.",
    )
