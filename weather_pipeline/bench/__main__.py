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
from weather_pipeline.bench import automation, herbie, status, subsetting, tiles

SECTIONS = {"subsetting": subsetting.run, "herbie": herbie.run, "tiles": tiles.run, "automation": automation.run, "status": status.run}


def merge_sections(document: str, sections: list[str]) -> str:
    """Replace each `## Title ...` section of `document` by the new one with the same title line."""
    def split(text: str) -> list[str]:
        out: list[str] = []
        for line in text.splitlines(keepends=True):
            if line.startswith("## ") or not out:
                out.append(line)
            else:
                out[-1] += line
        return out

    blocks = split(document)
    for new in sections:
        title = new.splitlines()[0]
        matches = [i for i, b in enumerate(blocks) if b.splitlines()[0] == title]
        body = new if new.endswith("\n") else new + "\n"
        if matches:
            blocks[matches[0]] = body
        else:
            blocks.append(body)
    return "".join(blocks)


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
        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.only and path.is_file():
            # Replace only the sections that ran; the others keep their figures and dates.
            text = merge_sections(path.read_text(), parts[4:])
        path.write_text(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
