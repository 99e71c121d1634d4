"""Where the real NOAA test files are: ../shared/testdata/real beside the repository."""

from pathlib import Path

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "real"
