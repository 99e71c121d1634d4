"""The code location, imported slowly once: the fault table's "code server slow to start" case.

The daemon loads this module instead of `weather_pipeline.definitions`; the first process to
import it (the daemon's code server) sleeps WEATHER_PIPELINE_FAULT_SLOW_IMPORT_S seconds, as an
import does on a loaded machine, and leaves WEATHER_PIPELINE_FAULT_SLOW_MARKER behind so that the
run workers that import it later do not sleep again. Never used outside that case.
"""

import os
import time
from pathlib import Path

_marker = os.environ.get("WEATHER_PIPELINE_FAULT_SLOW_MARKER")
if _marker and not Path(_marker).exists():
    Path(_marker).touch()
    time.sleep(float(os.environ.get("WEATHER_PIPELINE_FAULT_SLOW_IMPORT_S", "0")))

from weather_pipeline.definitions import defs  # noqa: E402,F401  (the code location itself)
