"""A generated mirror shared by the tests of one session (generation costs seconds)."""

from __future__ import annotations

from pathlib import Path

from weather_pipeline.mirror.generate import generate_run

HRRR_RUN = "20260512_00"
GFS_RUN = "20260512_06"
HRRR_HOURS = (0, 1, 2)
GFS_HOURS = (0, 1)


def build_mirror(root: Path) -> Path:
    generate_run(root, "hrrr", HRRR_RUN, HRRR_HOURS)
    generate_run(root, "gfs", GFS_RUN, GFS_HOURS)
    return root
