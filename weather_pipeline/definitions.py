"""The Dagster code location: assets built from the catalog, resources from the environment."""

from dagster import Definitions

from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.orchestration.assets import build_grib_asset, build_tile_asset
from weather_pipeline.orchestration.resources import resources_from_env

catalog = load_catalog()

defs = Definitions(
    assets=[build(model) for model in catalog.models.values() for build in (build_grib_asset, build_tile_asset)],
    resources=resources_from_env(),
)
