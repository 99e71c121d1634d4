"""Downloads side by side with Herbie: 13 HRRR hours, six variables, one mirror, one run.

What a user would pick instead of this project for fetching subsets is Herbie's `FastHerbie`
(threads over hours, `.idx` byte ranges, no checks on what arrives). Herbie is pointed at the
mirror with a subclass of its own HRRR template whose only source is the mirror; this project
reaches the same mirror through its `mirror` source. Requests and bytes are counted by the mirror
server. Cases run in interleaved rounds (each case once per round) so noise falls on all alike;
figures are medians, ratios are of medians from this same run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from weather_pipeline.core.cache import CacheLayout
from weather_pipeline.core.catalog import load_catalog
from weather_pipeline.core.http import HttpClient, HttpConfig, _HostLimiter
from weather_pipeline.core.ingest import HOURS_AT_ONCE, ingest_hours
from weather_pipeline.core.sources import SourceSettings
from weather_pipeline.mirror.generate import generate_run, mirror_relative_path
from weather_pipeline.mirror.server import MirrorServer

RUN = "20260512_00"
HOURS = tuple(range(13))
ROUNDS = 5
CLI_ROUNDS = 3
REPO = Path(__file__).resolve().parents[2]


def _herbie_template(mirror_url: str):
    """A subclass of Herbie's HRRR template whose one source is the mirror."""
    os.environ.setdefault("HERBIE_CONFIG_PATH", tempfile.mkdtemp(prefix="wp-herbie-config-"))
    import herbie.models as templates

    class hrrr_mirror(templates.hrrr):  # noqa: N801 - Herbie looks templates up by model name
        def template(self):  # called by Herbie with the Herbie object as `self`
            templates.hrrr.template(self)
            run = f"{self.date:%Y%m%d_%H}"
            self.SOURCES = {"mirror": f"{mirror_url}/{mirror_relative_path('hrrr', run, self.fxx)}"}

    templates.hrrr_mirror = hrrr_mirror
    return "hrrr_mirror"


def _message_digests(data: bytes) -> set[str]:
    from weather_pipeline.core import grib

    return {hashlib.md5(data[s.offset:s.end]).hexdigest() for s in grib.iter_message_spans(data)}


def run(say=print) -> str:
    catalog = load_catalog()
    model = catalog.model("hrrr")
    variables = model.default_variables
    search = "|".join(v.search for v in variables)
    with tempfile.TemporaryDirectory(prefix="wp-bench-herbie-") as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "mirror"
        t0 = time.monotonic()
        say(f"  generating hrrr {RUN} f000-f{HOURS[-1]:03d} ({len(HOURS)} hours)")
        generate_run(root, "hrrr", RUN, HOURS)
        say(f"  mirror generated in {time.monotonic() - t0:.0f} s")
        with MirrorServer(root) as server:
            herbie_model = _herbie_template(server.url)
            settings = SourceSettings(order=("mirror",), mirror_url=server.url)
            counter = iter(range(10**6))

            def fresh(name: str) -> Path:
                return tmp_path / f"{name}-{next(counter)}"

            def ours(hours_at_once: int, connections: int, limited: bool = False) -> Callable[[], object]:
                def call():
                    config = HttpConfig(max_connections_per_host=connections,
                                        rate_limits={"127.0.0.1": 1_000_000} if limited else {},
                                        rate_limit_db=tmp_path / "bench-ratelimit.sqlite")
                    cache = CacheLayout(fresh("cache"))
                    with HttpClient(config) as client, ingest_hours(
                        "hrrr", [(RUN, h) for h in HOURS], hours_at_once=hours_at_once, client=client,
                        cache=cache, settings=settings,
                    ) as batch:
                        results = list(batch)
                    bad = [r for *_x, r in results if isinstance(r, BaseException)]
                    if bad:
                        raise bad[0]
                    return cache
                return call

            def fast_herbie():
                from herbie import FastHerbie

                save = fresh("herbie")
                fh = FastHerbie([datetime.strptime(RUN, "%Y%m%d_%H")], fxx=list(HOURS), model=herbie_model,
                                product="sfc", priority=["mirror"], save_dir=save, verbose=False)
                files = fh.download(search, errors="raise")
                if len(files) != len(HOURS):
                    raise RuntimeError(f"FastHerbie downloaded {len(files)} of {len(HOURS)} hours")
                return save

            home = tmp_path / "dagster_home"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            from dagster import DagsterInstance

            with DagsterInstance.from_config(str(home)) as instance:
                instance.add_dynamic_partitions("hrrr_runs", [RUN])

            def materialize():
                cache = fresh("cli-cache")
                env = {**os.environ, "DAGSTER_HOME": str(home), "WEATHER_PIPELINE_SOURCES": "mirror",
                       "WEATHER_PIPELINE_MIRROR_URL": server.url, "WEATHER_PIPELINE_CACHE": str(cache)}
                cmd = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m",
                       "weather_pipeline.definitions", "--select", "hrrr_grib", "--partition-range",
                       f"{HOURS[0]:03d}|{RUN}...{HOURS[-1]:03d}|{RUN}"]
                done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
                if done.returncode:
                    raise RuntimeError(f"dagster asset materialize exited {done.returncode}: {done.stderr[-2000:]}")
                return CacheLayout(cache)

            cases: dict[str, tuple[Callable[[], object], int]] = {
                "ours": (ours(HOURS_AT_ONCE, HttpConfig().max_connections_per_host), ROUNDS),
                "ours_serial": (ours(1, 1), ROUNDS),
                "ours_limited": (ours(HOURS_AT_ONCE, HttpConfig().max_connections_per_host, limited=True), ROUNDS),
                "herbie": (fast_herbie, ROUNDS),
                "cli": (materialize, CLI_ROUNDS),
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            requests: dict[str, list[int]] = {k: [] for k in cases}
            nbytes: dict[str, list[int]] = {k: [] for k in cases}
            outputs: dict[str, object] = {}
            for r in range(max(n for _f, n in cases.values())):
                for name, (fn, rounds) in cases.items():
                    if r >= rounds:
                        continue
                    server.clear_log()
                    t = time.perf_counter()
                    outputs[name] = fn()
                    times[name].append(time.perf_counter() - t)
                    log = server.request_log
                    requests[name].append(len(log))
                    nbytes[name].append(sum(rec.body_bytes for rec in log))
                say(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if len(v) > r))
            # The same messages? Every message we cached is in Herbie's file of that hour and back.
            cache = outputs["ours"]
            save = outputs["herbie"]
            same = True
            for hour in HOURS:
                ours_digests: set[str] = set()
                for path in cache.grib_paths_for_hour("hrrr", RUN, hour).values():
                    ours_digests |= _message_digests(path.read_bytes())
                herbie_files = [p for p in Path(save).rglob("*.grib2") if f"f{hour:02d}" in p.name]
                herbie_digests: set[str] = set()
                for p in herbie_files:
                    herbie_digests |= _message_digests(p.read_bytes())
                same &= bool(ours_digests) and ours_digests == herbie_digests
            limiter = _HostLimiter(tmp_path / "micro-ratelimit.sqlite", "bench.invalid", 10**9, 60.0)
            n = 500
            t = time.perf_counter()
            for _ in range(n):
                limiter.acquire()
            limiter_us = (time.perf_counter() - t) / n * 1e6

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    req = {k: statistics.median(v) for k, v in requests.items()}
    byt = {k: statistics.median(v) for k, v in nbytes.items()}

    def row(label: str, key: str) -> str:
        return (f"| {label} | {med[key]:.2f} ({best[key]:.2f}) | {len(times[key])} | {req[key]:.0f} | {byt[key]:,.0f} "
                f"| {med[key] / med['herbie']:.2f} |")

    def verdict(ratio: float, target: float) -> str:
        return f"**{ratio:.2f}** (target ≤ {target:g}: **{'met' if ratio <= target else 'missed'}**)"

    per_request_limited = (med["ours_limited"] - med["ours"]) / max(req["ours_limited"], 1) * 1e3
    lines = [
        "## Downloads side by side with Herbie (issue 10)",
        "",
        "Command: `python -m weather_pipeline.bench --only herbie` (part of `make bench`).",
        "",
        f"One mirror of HRRR run {RUN}, hours f000-f{HOURS[-1]:03d} ({len(HOURS)} hours), the six default variables "
        f"({', '.join(v.name for v in variables)}; no APCP at f000), served by `MirrorServer` on loopback. "
        "Each call starts from an empty cache / save directory. Requests and bytes are counted by the mirror.",
        "",
        f"* **this project, in-process**: `ingest_hours` over the {len(HOURS)} hours with a new `HttpClient` "
        f"(hours {HOURS_AT_ONCE} at a time, at most {HttpConfig().max_connections_per_host} requests in flight to "
        "the server): `.idx`, Range requests, framing, section chain and identity of every message from its "
        "headers, hour files written to temp names and renamed together.",
        "* **this project, one request at a time**: the same with one hour at a time and one request in flight.",
        "* **this project, rate limiter on**: as the first, with a per-host limit of 1,000,000 requests a minute "
        "for 127.0.0.1, so every request passes the SQLite bucket as NOMADS' do.",
        f"* **FastHerbie**: `FastHerbie([run], fxx=0..{HOURS[-1]}, model=\"hrrr_mirror\", product=\"sfc\", "
        "priority=[\"mirror\"]).download(search, errors=\"raise\")` with `hrrr_mirror` a subclass of Herbie's "
        "`hrrr` template whose only source is the mirror, `search` the six catalog patterns joined by `|`. "
        f"Herbie {_herbie_version()}; it checks nothing about what arrives.",
        "* **`dagster asset materialize`**: `dagster asset materialize -m weather_pipeline.definitions --select "
        f"hrrr_grib --partition-range \"000|{RUN}...{HOURS[-1]:03d}|{RUN}\"` in a subprocess against a fresh SQLite "
        "instance: one Dagster run for the 13 hours (process start-up, definitions, run and event storage "
        "included).",
        "",
        "| case | median s (best) | calls | requests | bytes | / FastHerbie |",
        "|---|---|---|---|---|---|",
        row("this project, in-process", "ours"),
        row("this project, one request at a time", "ours_serial"),
        row("this project, rate limiter on", "ours_limited"),
        row("FastHerbie", "herbie"),
        row("`dagster asset materialize` of the batch", "cli"),
        "",
        "| target | ratio |",
        "|---|---|",
        f"| in-process ingest / FastHerbie | {verdict(med['ours'] / med['herbie'], 0.5)} |",
        f"| `dagster asset materialize` / FastHerbie | {verdict(med['cli'] / med['herbie'], 1.0)} |",
        "",
        f"Same messages: every message this project cached is in Herbie's file of the same hour and the other way "
        f"round, by md5: **{'yes' if same else 'NO'}**. Herbie's extra requests are its HEAD checks of the GRIB and "
        f"the `.idx` of each hour. The rate limiter costs {limiter_us:.0f} µs per acquire in a tight loop "
        f"(500 calls, one thread) and {per_request_limited:+.1f} ms per request in the ingest case (difference of "
        "medians, within noise when small). Concurrency: the serial case is "
        f"{med['ours_serial'] / med['ours']:.1f}x the concurrent one.",
        "",
    ]
    return "\n".join(lines)


def _herbie_version() -> str:
    try:
        from importlib.metadata import version

        return version("herbie-data")
    except Exception:  # noqa: BLE001
        return "(version unknown)"
