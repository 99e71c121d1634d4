"""weather_pipeline: a live, verified cache of NOAA weather model output, orchestrated by Dagster."""

# pyproj must load its own PROJ library before eccodes is imported: the eccodes wheel loads
# eckit's bundled PROJ with RTLD_GLOBAL, and if that happens first pyproj binds to the wrong
# PROJ and the process aborts at exit ("double free or corruption").  Every entry point
# (CLI, Dagster code location, tests) imports this package first.
import pyproj  # noqa: F401
