"""`python -m weather_pipeline.faults [--fast] [--only NAME] [--write docs/reliability.md]`."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import weather_pipeline  # noqa: F401  (native-library load order)
from weather_pipeline.faults.cases import FAST_CASES
from weather_pipeline.faults.harness import build_mirror, markdown_table, run_case

INTRO = """# Reliability: the fault table

Every row is one fault injected into the real code paths (the ingest, ScanSource, `gaps plan`,
Dagster materializations, the cache checks, the daemon) against the loopback NOAA mirror, and
measured the same way: **partial files** are temporary files left in the cache, files of a
refused hour, tiles that do not load or lack a sidecar, and anything written outside the cache
root; **good files lost** are files present and verified before the fault (each case starts
from a cache holding good HRRR and GFS hours) that are missing or changed after it; **time to
verdict** runs from the injection to the refusal or the successful end. "ok" means the fault
ended as a trustworthy cache must: refused with a clear error naming the input, or survived by
a retry that succeeded.

Produced by `make faults` (`python -m weather_pipeline.faults --write docs/reliability.md`);
the fast cases are tests in `make test` (`weather_pipeline_tests/faults/`), the daemon cases
are tests marked slow that CI runs too.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weather_pipeline.faults", description=__doc__)
    parser.add_argument("--fast", action="store_true", help="only the fast cases (no daemon)")
    parser.add_argument("--only", action="append", default=[], help="run only cases whose name contains this")
    parser.add_argument("--write", metavar="PATH", help="write the table to this Markdown file")
    args = parser.parse_args(argv)
    cases = list(FAST_CASES)
    if not args.fast:
        from weather_pipeline.faults.daemon_cases import DAEMON_CASES

        cases += DAEMON_CASES
    if args.only:
        cases = [c for c in cases if any(o in c.name for o in args.only)]
    rows = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="weather-faults-") as tmp:
        work = Path(tmp)
        print("generating the mirror ...", file=sys.stderr, flush=True)
        mirror = build_mirror(work / "base-mirror")
        for i, case in enumerate(cases, 1):
            row = run_case(case, work / f"case{i:02d}", mirror)
            rows.append(row)
            print(f"[{i}/{len(cases)}] {'ok ' if row.ok else 'BAD'} {row.seconds:6.1f} s  {case.name}: {row.outcome}"
                  f" (partial {row.partial_files}, lost {row.good_files_lost})", file=sys.stderr, flush=True)
    table = markdown_table(rows)
    bad = [r for r in rows if not r.ok]
    summary = (f"{len(rows)} cases, {len(rows) - len(bad)} ok; partial files in total: "
               f"{sum(r.partial_files for r in rows)}; good files lost in total: {sum(r.good_files_lost for r in rows)}.")
    print(table)
    print(summary, file=sys.stderr)
    if args.write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"{INTRO}\nMeasured {stamp} on {platform.node()} ({platform.machine()}, "
                f"{platform.python_version()}) in {time.monotonic() - t0:.0f} s: {summary}\n\n{table}\n")
        Path(args.write).write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
