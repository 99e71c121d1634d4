"""The fault table: every fault the pipeline must survive or refuse, run through its real code
paths against the loopback mirror, measured the same way, written to docs/reliability.md.

`python -m weather_pipeline.faults [--fast] [--write docs/reliability.md]` (`make faults`); the
fast cases are also tests (`weather_pipeline_tests/faults/`), the slow ones (the daemon path)
are tests marked slow.
"""
