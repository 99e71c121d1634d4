"""`weather-pipeline`: the command line (demo, local mirror, inventories).

Every command has --help. Errors in the input exit with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from weather_pipeline.core.catalog import CatalogError, InvalidRequest, load_catalog, parse_hours


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


#: exit status when a source could not be reached (the answer would be incomplete)
EXIT_UNREACHABLE = 3


def _cmd_inventory(args: argparse.Namespace) -> int:
    from weather_pipeline.core.http import FetchError, HttpClient
    from weather_pipeline.core.idx import IdxError, parse_idx, search

    target: str = args.path_or_url
    pattern = _regex(args.search)
    try:
        if target.startswith(("http://", "https://")):
            with HttpClient() as client:
                text = client.get_text(target)
        else:
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"no such file: {target}")
            head = path.open("rb").read(4)
            if head == b"GRIB":
                # A GRIB file rather than its .idx: index it locally, as the fallback does.
                from weather_pipeline.core.grib import build_index

                text = build_index(path.read_bytes())
            else:
                text = path.read_text(errors="replace")
        entries = parse_idx(text, source=target)
        if pattern is not None:
            entries = search(entries, pattern)
    except (IdxError, FetchError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        json.dump([e.as_json() for e in entries], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for e in entries:
            end = "" if e.end is None else str(e.end)
            print(f"{e.msg:>6} {e.start:>12}-{end:<12} {e.variable}:{e.level}:{e.forecast}")
        print(f"{len(entries)} message(s)", file=sys.stderr)
    return 0


def _regex(text: str | None):
    """A --search pattern compiled, or UsageError naming it."""
    import re

    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise UsageError(f"--search {text!r} is not a valid regular expression: {exc}") from None


def _port_free(host: str, port: int, what: str) -> None:
    """UsageError naming the port if it cannot be bound (checked before anything is started)."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot serve {what} on {host}:{port}: {exc.strerror or exc} "
                             f"(choose another with --port)") from None


def _cmd_mirror_generate(args: argparse.Namespace) -> int:
    from weather_pipeline.mirror.generate import generate_run

    model = load_catalog().model(args.model)
    model.validate_run(args.run)
    hours = parse_hours(args.hours)
    for h in hours:
        model.validate_hour(args.run, h)
    root = Path(args.root)
    paths = generate_run(root, args.model, args.run, hours, seed=args.seed, progress=lambda m: print(m, file=sys.stderr))
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files ({total / 1e6:.1f} MB) under {root}")
    return 0


def _cmd_mirror_serve(args: argparse.Namespace) -> int:
    from weather_pipeline.mirror.server import MirrorServer

    root = Path(args.root)
    if not root.is_dir():
        raise UsageError(f"mirror root {root} is not a directory (run `weather-pipeline mirror generate` first)")
    _port_free(args.host, args.port, "the mirror")
    try:
        server = MirrorServer(root, host=args.host, port=args.port, verbose=args.verbose)
    except OSError as exc:
        raise UsageError(f"cannot serve the mirror on {args.host}:{args.port}: {exc.strerror or exc}") from None
    print(f"serving {root} at {server.url}  (export WEATHER_PIPELINE_MIRROR_URL={server.url})", flush=True)
    server.serve_forever()
    return 0


def _weights_dir() -> Path:
    """Where the `tile` command keeps regridding weights between calls (computing HRRR's for
    conus at 0.05 deg takes longer than loading them): the cache's, when one is configured,
    else the user's cache directory."""
    import os

    if os.environ.get("WEATHER_PIPELINE_CACHE"):
        from weather_pipeline.core.cache import CacheLayout

        return CacheLayout(Path(os.environ["WEATHER_PIPELINE_CACHE"])).weights_dir
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "weather-pipeline" / "weights"


def _cmd_tile(args: argparse.Namespace) -> int:
    from weather_pipeline.core.grib import GribError  # eccodes: the tile needs it anyway
    from weather_pipeline.core.regrid import RegridError, TargetGrid
    from weather_pipeline.core.tiles import TileError, tile_from_file

    path = Path(args.grib_file)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if not args.output.endswith(".npz"):
        raise UsageError(f"output {args.output!r} must end in .npz (the sidecar goes beside it as .meta.json)")
    _regex(args.search)
    try:
        target = TargetGrid.parse_bbox(args.bbox, args.res)
        sidecar = tile_from_file(path, target, Path(args.output), method=args.method, search=args.search,
                                 allow_empty=args.allow_empty, cache_dir=_weights_dir())
    except (RegridError, TileError, GribError) as exc:
        raise UsageError(str(exc)) from None
    stats = sidecar["stats"]
    print(f"wrote {args.output} {tuple(sidecar['shape'])} from {sidecar['message']}: "
          f"min {stats['min']}, max {stats['max']}, NaN fraction {stats['nan_fraction']:.4f}")
    return 0


def find_dagster_home(environ=None, cwd: Path | None = None) -> tuple[Path, str]:
    """The instance directory, as make finds it: $DAGSTER_HOME, else ./.dagster_home if it exists."""
    import os

    environ = os.environ if environ is None else environ
    if environ.get("DAGSTER_HOME"):
        return Path(environ["DAGSTER_HOME"]), "from $DAGSTER_HOME"
    local = (cwd or Path.cwd()) / ".dagster_home"
    if local.is_dir():
        return local, "the project's ./.dagster_home ($DAGSTER_HOME is not set)"
    raise UsageError("no Dagster instance: DAGSTER_HOME is not set and there is no ./.dagster_home here "
                     "(run `make demo` first, or point DAGSTER_HOME at your instance)")


def _instance():
    import os

    home, how = find_dagster_home()
    if not home.is_dir():
        raise UsageError(f"DAGSTER_HOME={home} is not a directory")
    print(f"instance: {home} ({how})", file=sys.stderr)
    os.environ["DAGSTER_HOME"] = str(home.absolute())

    from dagster import DagsterInstance

    return DagsterInstance.get()


def _cmd_gaps_plan(args: argparse.Namespace) -> int:
    if args.since:
        from weather_pipeline.core.catalog import parse_run_key

        parse_run_key(args.since)
    models = [load_catalog().model(args.model).name] if args.model else None
    find_dagster_home()  # before the heavy imports: a missing instance answers at once

    from weather_pipeline.orchestration import gaps
    from weather_pipeline.orchestration.resources import resources_from_env

    incomplete = None
    with _instance() as instance:
        try:
            found = gaps.plan(instance, resources_from_env()["noaa"], models=models, since=args.since,
                              progress=lambda m: print(m, file=sys.stderr))
        except gaps.PlanIncomplete as exc:
            found, incomplete = exc.gaps, exc
    for g in found:
        print(g.to_json())
    print(f"{len(found)} missing hours that the source has", file=sys.stderr)
    if incomplete is not None:
        print(f"weather-pipeline: error: {incomplete}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return 0


def _read_manifest(path: str):
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such manifest: {path}")
    find_dagster_home()

    from weather_pipeline.orchestration import gaps

    try:
        return gaps.read_manifest(p.read_text().splitlines())
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _cmd_gaps_dispatch(args: argparse.Namespace) -> int:
    entries = _read_manifest(args.manifest)
    from weather_pipeline.orchestration import gaps

    if not entries:
        print("manifest is empty: nothing to dispatch")
        return 0
    with _instance() as instance:
        ids = gaps.dispatch(instance, entries)
    print(f"launched {len(ids)} backfills (priority {gaps.GAP_FILL_PRIORITY}) for {len(entries)} hours: {', '.join(ids)}")
    print("the Dagster daemon runs them (make dev, or dagster-daemon run)")
    return 0


def _cmd_gaps_verify(args: argparse.Namespace) -> int:
    entries = _read_manifest(args.manifest)
    from weather_pipeline.orchestration import gaps

    with _instance() as instance:
        still = gaps.verify(instance, entries)
    if still:
        print(f"{len(still)} of {len(entries)} entries still missing: {gaps.summarize(still)}")
        return 1
    print(f"all {len(entries)} entries are materialized")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import os

    from weather_pipeline.core.cache import CacheLayout
    from weather_pipeline.core.status import EXIT_CODES, fresh_document, summary_text

    find_dagster_home()  # before the heavy imports: a missing instance answers at once
    layout = CacheLayout(Path(os.environ.get("WEATHER_PIPELINE_CACHE", "cache")))
    doc = None if args.fresh else fresh_document(layout.deep_status_path)
    if doc is not None:
        print(f"from {layout.deep_status_path} (written by the deep_status sensor at {doc['generated_at']}; "
              "--fresh to compute it now)", file=sys.stderr)
    else:
        from weather_pipeline.orchestration.status import deep_status

        with _instance() as instance:
            doc = deep_status(instance, layout)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(summary_text(doc))
        print(f"page: weather-pipeline serve-status, then http://127.0.0.1:8766/status"
              f"  (cache: {os.environ.get('WEATHER_PIPELINE_CACHE', 'cache')})")
    return EXIT_CODES[doc["health"]]


def _cmd_serve_status(args: argparse.Namespace) -> int:
    _port_free(args.host, args.port, "the status page")
    from weather_pipeline.orchestration.resources import resources_from_env
    from weather_pipeline.orchestration.status import dagster_url
    from weather_pipeline.status.app import serve

    path = resources_from_env()["cache"].layout().deep_status_path
    print(f"serving {path} at http://{args.host}:{args.port}/status (API: /api/status/deep, /health)", flush=True)
    serve(path, host=args.host, port=args.port, dagster_url=args.dagster_url or dagster_url())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    hrrr_hours, gfs_hours = parse_hours(args.hrrr_hours), parse_hours(args.gfs_hours)
    from weather_pipeline.demo import run_demo

    return run_demo(
        workdir=Path(args.workdir),
        hrrr_hours=hrrr_hours,
        gfs_hours=gfs_hours,
        **({"timeout_s": args.timeout} if args.timeout is not None else {}),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weather-pipeline",
        description="Keep a live, verified cache of NOAA weather model data (HRRR, GFS) with Dagster.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log HTTP retries and other details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="the full flow against a generated local NOAA mirror",
        description="Generate a small local mirror (the newest HRRR and GFS runs, a few hours each), serve it "
        "on loopback, and run the Dagster daemon on the project's instance ($DAGSTER_HOME) until the data "
        "is in: the ScanSource sensors queue the ingest runs and the tiles follow. Then print a summary, "
        "the tiles written and the deep status.",
    )
    p.add_argument("--workdir", default=".", help="where cache/ and mirror/ go (default: current directory)")
    p.add_argument("--hrrr-hours", default="0-3", help="HRRR forecast hours to generate and ingest (default 0-3)")
    p.add_argument("--gfs-hours", default="0-3", help="GFS forecast hours to generate and ingest (default 0-3)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="how long the flow may take once the daemon and its code server are ready (default "
                        "900, or $WEATHER_PIPELINE_DEMO_TIMEOUT_S); runs in flight are always waited for")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("mirror", help="the local NOAA mirror: generate and serve", description="The local NOAA mirror.")
    msub = p.add_subparsers(dest="mirror_command", required=True, metavar="SUBCOMMAND")
    g = msub.add_parser(
        "generate",
        help="write NOAA-identical GRIB2 + .idx files for a run",
        description="Write NOAA-identical files (same paths and names, real GRIB2 on the real grids, "
        "wgrib2-format .idx) for one model run under ROOT/<bucket>/...",
    )
    g.add_argument("--root", default="mirror", help="mirror root directory (default: ./mirror)")
    g.add_argument("--model", required=True, help="model name from the catalog (hrrr, gfs, ...)")
    g.add_argument("--run", required=True, help="run key YYYYMMDD_HH, e.g. 20260512_00")
    g.add_argument("--hours", default="0-2", help='forecast hours, e.g. "0-6" or "0-12/3,18" (default 0-2)')
    g.add_argument("--seed", type=int, default=0, help="random seed for the synthetic fields")
    g.set_defaults(func=_cmd_mirror_generate)
    s = msub.add_parser(
        "serve",
        help="serve a mirror over HTTP on loopback (S3-like, with Range support)",
        description="Serve ROOT over HTTP like S3 (Range requests, HEAD, 404s) until interrupted.",
    )
    s.add_argument("--root", default="mirror", help="mirror root directory (default: ./mirror)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    s.add_argument("--verbose", action="store_true", help="log one line per request")
    s.set_defaults(func=_cmd_mirror_serve)

    p = sub.add_parser(
        "gaps",
        help="gap fill: plan, dispatch and verify missing forecast hours",
        description="Gap fill against the Dagster instance in $DAGSTER_HOME and the sources configured "
        "by WEATHER_PIPELINE_SOURCES (see README).",
    )
    gsub = p.add_subparsers(dest="gaps_command", required=True, metavar="SUBCOMMAND")
    g = gsub.add_parser("plan", help="list missing (model, run, hour) that the source has, as JSON lines",
                        description="Print one JSON line per forecast hour the source has and the GRIB asset "
                        "has not materialized, for runs within each model's retention (or since --since).")
    g.add_argument("--model", help="only this model (default: every catalog model)")
    g.add_argument("--since", metavar="YYYYMMDD_HH", help="oldest run to consider (default: retention window)")
    g.set_defaults(func=_cmd_gaps_plan)
    g = gsub.add_parser("dispatch", help="launch a manifest as low-priority Dagster backfills",
                        description="Launch one asset backfill per model run for the manifest's hours, at "
                        "low priority; the daemon batches contiguous hours into one run each.")
    g.add_argument("manifest", help="a manifest from `gaps plan` (JSON lines)")
    g.set_defaults(func=_cmd_gaps_dispatch)
    g = gsub.add_parser("verify", help="check a manifest's entries are materialized (exit 1 if not)",
                        description="Audit every manifest entry against the GRIB asset's materializations; "
                        "print what is still missing and exit with status 1 if anything is.")
    g.add_argument("manifest", help="a manifest from `gaps plan` (JSON lines)")
    g.set_defaults(func=_cmd_gaps_verify)

    p = sub.add_parser(
        "status",
        help="deep status: queue, per-run completeness, disk, alerts (exit 0 healthy, 1 degraded, 2 unhealthy)",
        description="Compute the deep status from the Dagster instance ($DAGSTER_HOME) and the cache "
        "($WEATHER_PIPELINE_CACHE) and print a summary, or the JSON document with --json. Exit status: "
        "0 healthy, 1 degraded, 2 unhealthy (for cron or a load balancer).",
    )
    p.add_argument("--json", action="store_true", help="print the deep-status JSON document")
    p.add_argument("--fresh", action="store_true",
                   help="compute the document now even when the deep_status sensor's one is current "
                        "(by default a document younger than 3 sensor intervals is shown as it is)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "serve-status",
        help="serve the status page and API over HTTP (/status, /api/status/deep, /health)",
        description="Serve cache/status/deep.json (kept current by the deep_status sensor) as a single-pane "
        "page at /status, the document at /api/status/deep and a health check at /health.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8766, help="port (default 8766)")
    p.add_argument("--dagster-url", help="Dagster UI base URL for links and Retry (default $WEATHER_PIPELINE_DAGSTER_URL "
                   "or http://127.0.0.1:3000)")
    p.set_defaults(func=_cmd_serve_status)

    p = sub.add_parser(
        "tile",
        help="build one NPZ tile (+ sidecar) from a local GRIB2 file",
        description="Regrid the first message of GRIB_FILE (or the first matching --search) to the regular "
        "lat/lon grid of --bbox at --res degrees and write OUT.npz (data, lat, lon) with OUT.meta.json "
        "beside it, with the same code the tile assets use. Grid-relative winds are left as published "
        "(rotation needs both components; the assets do it).",
    )
    p.add_argument("grib_file", metavar="GRIB_FILE", help="a local GRIB2 file")
    p.add_argument("--bbox", required=True, metavar="W,S,E,N", help="bounding box in degrees, e.g. -100,35,-95,40")
    p.add_argument("--res", required=True, type=float, metavar="DEG", help="grid spacing in degrees, e.g. 0.25")
    p.add_argument("--method", choices=("bilinear", "nearest"), default="bilinear", help="interpolation (default bilinear)")
    p.add_argument("--search", metavar="REGEX", help="use the first message whose inventory line matches")
    p.add_argument("--allow-empty", action="store_true",
                   help="write the tile even when the box lies outside the GRIB's grid (all NaN); refused otherwise")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="output tile path")
    p.set_defaults(func=_cmd_tile)

    p = sub.add_parser(
        "inventory",
        help="print the parsed .idx entries of a local file or URL",
        description="Parse a wgrib2 inventory (.idx) from a local file or URL and print its entries. A local "
        "GRIB2 file is indexed with eccodes instead. With --json, print a list of objects with keys "
        "msg, start, end (inclusive last byte, null when open-ended), variable, level, forecast.",
    )
    p.add_argument("path_or_url", metavar="PATH_OR_URL", help="an .idx file, a GRIB2 file, or an http(s) URL of an .idx")
    p.add_argument("--search", metavar="REGEX", help="keep entries whose line matches this regular expression")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inventory)
    return parser


#: options whose value may start with "-" (a western-hemisphere bbox: -100,35,-95,40)
_NEGATIVE_VALUE_OPTIONS = ("--bbox",)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--bbox -100,35,-95,40` -> `--bbox=-100,35,-95,40`: argparse would take the value for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _NEGATIVE_VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, CatalogError, InvalidRequest) as exc:
        print(f"weather-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`| head`): not an error; silence the interpreter's flush at exit
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
