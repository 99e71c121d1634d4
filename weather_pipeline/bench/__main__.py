"""`python -m weather_pipeline.bench [--write docs/benchmarks.md]`: run every benchmark."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import weather_pipeline  # noqa: F401  (native-library load order)
from weather_pipeline.bench import subsetting, tiles

SECTIONS = {"subsetting": subsetting.run, "tiles": tiles.run}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weather_pipeline.bench", description="Run the benchmarks.")
    parser.add_argument("--write", metavar="PATH", help="write the figures as Markdown to PATH")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    args = parser.parse_args(argv)
    parts = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (`python -m weather_pipeline.bench --write docs/benchmarks.md`) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Ratios are from one run on a shared, noisy machine.",
        "",
    ]
    for name in args.only or SECTIONS:
        print(f"[{name}]", flush=True)
        t0 = time.monotonic()
        parts.append(SECTIONS[name](lambda m: print(m, flush=True)))
        print(f"[{name}] {time.monotonic() - t0:.1f} s", flush=True)
    text = "\n".join(parts)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
