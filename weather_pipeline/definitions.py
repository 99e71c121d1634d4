"""The Dagster code location: assets built from the catalog, resources from the environment."""

from dagster import Definitions

from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.orchestration.assets import build_grib_asset
from weather_pipeline.orchestration.resources import resources_from_env

catalog = load_catalog()

defs = Definitions(
    assets=[build_grib_asset(model) for model in catalog.models.values()],
    resources=resources_from_env(),
)
