"""Asset checks of the tile assets, evaluated on each batch of hours a run builds.

Dagster records an AssetCheckResult against the run's materialization, not against one
partition of a multi-partition range, so each check covers every hour of the batch and lists
the hours and tiles that failed in its metadata.
"""

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue

from weather_pipeline.core.catalog import Catalog, Model
from weather_pipeline.core.tiles import HourTiles

MD5_CHECK = "sidecar_md5_matches_grib"
BOUNDS_CHECK = "values_within_physical_bounds"
NAN_CHECK = "nan_fraction_under_threshold"


def tile_check_specs(asset_key: AssetKey) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(MD5_CHECK, asset=asset_key,
                       description="Each tile's sidecar records the md5 of the GRIB subset the ingest recorded for that hour."),
        AssetCheckSpec(BOUNDS_CHECK, asset=asset_key,
                       description="Tile min/max lie within the variable's physical range from the catalog."),
        AssetCheckSpec(NAN_CHECK, asset=asset_key,
                       description="Each tile's NaN fraction is at most its region's max_nan_fraction."),
    ]


def _result(name: str, checked: int, failures: list[str], what: str) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=name,
        passed=not failures,
        severity=AssetCheckSeverity.ERROR if name != NAN_CHECK else AssetCheckSeverity.WARN,
        description=f"{checked} tiles checked; {len(failures)} {what}" if failures else f"{checked} tiles checked",
        metadata={"tiles_checked": checked, "failures": MetadataValue.json(failures[:200])},
    )


def evaluate_tile_checks(model: Model, catalog: Catalog, reports: list[HourTiles],
                         ingested_md5: dict[tuple[str, int], dict[str, str] | None]) -> list[AssetCheckResult]:
    """The three checks over a batch; `ingested_md5[(run, hour)]` comes from the GRIB asset's metadata."""
    md5_bad, bounds_bad, nan_bad, n = [], [], [], 0
    for rep in reports:
        recorded = ingested_md5.get((rep.run, rep.hour))
        for r in rep.results:
            n += 1
            where = f"{rep.run} f{rep.hour:03d} {r.variable} {r.region}/{r.res:g}deg"
            if recorded is None:
                md5_bad.append(f"{where}: no GRIB materialization recorded for this hour")
            elif recorded.get(r.variable) != r.source_grib_md5:
                md5_bad.append(f"{where}: sidecar {r.source_grib_md5}, ingested {recorded.get(r.variable)}")
            low, high = model.variables[r.variable].valid_range or (float("-inf"), float("inf"))
            vmin, vmax = r.stats.get("min"), r.stats.get("max")
            if vmin is not None and (vmin < low or vmax > high):
                bounds_bad.append(f"{where}: [{vmin:.6g}, {vmax:.6g}] outside [{low:g}, {high:g}]")
            limit = catalog.region(r.region).max_nan_fraction
            if r.stats["nan_fraction"] > limit:
                nan_bad.append(f"{where}: NaN fraction {r.stats['nan_fraction']:.4f} > {limit:g}")
    return [
        _result(MD5_CHECK, n, md5_bad, "disagree with the ingested GRIB"),
        _result(BOUNDS_CHECK, n, bounds_bad, "out of bounds"),
        _result(NAN_CHECK, n, nan_bad, "over the NaN threshold"),
    ]
