"""The fast rows of the fault table, each a test: ok, no partial file, no good file lost."""

from __future__ import annotations

import pytest

from weather_pipeline.faults.cases import FAST_CASES
from weather_pipeline.faults.harness import run_case


@pytest.mark.parametrize("case", FAST_CASES, ids=[c.name for c in FAST_CASES])
def test_fault_case(case, mirror_root, tmp_path):
    row = run_case(case, tmp_path / "world", mirror_root)
    assert row.ok, f"{row.outcome}: {row.message}"
    assert row.partial_files == 0 and row.good_files_lost == 0, row
