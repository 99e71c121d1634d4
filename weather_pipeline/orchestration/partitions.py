"""Partitions: one asset per model, keyed by run (dynamic, named per model) x hour (static).

Dagster multipartitions have exactly two dimensions and order a key's parts by dimension
name, so the string form of (run=20260512_00, hour=6) is "006|20260512_00". Build keys with
`partition_key()`; the CLI form is documented in the README.
"""

from __future__ import annotations

from functools import lru_cache

from dagster import (
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
)

from weather_pipeline.core.catalog import InvalidRequest, Model


def hour_key(hour: int) -> str:
    return f"{hour:03d}"


@lru_cache(maxsize=None)
def run_partitions(model_name: str) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=f"{model_name}_runs")


@lru_cache(maxsize=None)
def _model_partitions(model_name: str, hours: tuple[int, ...]) -> MultiPartitionsDefinition:
    return MultiPartitionsDefinition(
        {"run": run_partitions(model_name), "hour": StaticPartitionsDefinition([hour_key(h) for h in hours])}
    )


def model_partitions(model: Model) -> MultiPartitionsDefinition:
    return _model_partitions(model.name, model.all_hours)


def partition_key(run: str, hour: int) -> MultiPartitionKey:
    return MultiPartitionKey({"run": run, "hour": hour_key(hour)})


def parse_partition_key(key: str | MultiPartitionKey) -> tuple[str, int]:
    """(run, hour) from a MultiPartitionKey or its string form "006|20260512_00"."""
    if isinstance(key, MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["run"], int(dims["hour"])
    parts = str(key).split("|")
    if len(parts) != 2 or not parts[0].isdigit():
        raise InvalidRequest(f"malformed partition key {key!r}: expected 'HHH|YYYYMMDD_HH', e.g. '006|20260512_00'")
    return parts[1], int(parts[0])
