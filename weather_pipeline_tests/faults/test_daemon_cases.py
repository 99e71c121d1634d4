"""The fault table's process faults on the production path (daemon, code server, run workers)."""

from __future__ import annotations

import pytest

from weather_pipeline.faults.daemon_cases import DAEMON_CASES
from weather_pipeline.faults.harness import run_case

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", DAEMON_CASES, ids=[c.name for c in DAEMON_CASES])
def test_process_fault(case, mirror_root, tmp_path):
    row = run_case(case, tmp_path / "world", mirror_root)
    assert row.ok, f"{row.outcome}: {row.message}"
    assert row.partial_files == 0 and row.good_files_lost == 0, row
