"""The fast cases of the fault table: tampered sources, dead sources, transfer faults, hostile
input, a full disk, a damaged cache. Each drives a real code path against the mirror."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from weather_pipeline.core.cache import CacheLayout, CacheWriteError, sidecar_path
from weather_pipeline.core.catalog import CatalogError, InvalidRequest, build_catalog, load_catalog
from weather_pipeline.core.http import (
    FetchError,
    RangeIgnored,
    RedirectRefused,
    ResponseTooLarge,
    TransientError,
)
from weather_pipeline.core.idx import IdxError
from weather_pipeline.core.ingest import (
    MessageMismatch,
    SourceAsksToWait,
    SourceInconsistent,
    SourceUnreachable,
)
from weather_pipeline.core.sources import SourceSettings
from weather_pipeline.faults.harness import (
    GFS_RUN,
    HRRR_RUN,
    NOW,
    Case,
    Outcome,
    World,
    refused,
    survived,
)
from weather_pipeline.mirror.server import MirrorServer


def _idx(world: World, hour: int, model: str = "hrrr", run: str = HRRR_RUN) -> Path:
    return world.mirror_file(model, run, hour, ".idx")


def _swap_fields(text: str, a: str, b: str) -> str:
    """Swap what two .idx lines say their messages are (their offsets stay)."""
    lines = text.splitlines()
    ia = next(i for i, line in enumerate(lines) if a in line)
    ib = next(i for i, line in enumerate(lines) if b in line)
    head = lambda line: ":".join(line.split(":")[:3])  # noqa: E731
    tail = lambda line: ":".join(line.split(":")[3:])  # noqa: E731
    lines[ia], lines[ib] = f"{head(lines[ia])}:{tail(lines[ib])}", f"{head(lines[ib])}:{tail(lines[ia])}"
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _blackhole() -> Iterator[int]:
    """A port whose connects time out: its listen queue is full, so new SYNs are dropped."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=2)
    try:
        yield srv.getsockname()[1]
    finally:
        filler.close()
        srv.close()


def _with_source(name: str, base_url: str, listing: bool = True):
    """The embedded catalog plus a source `name` serving every model from `base_url`."""
    raw = json.loads(json.dumps(load_catalog().raw, default=str))
    raw["sources"][name] = {"title": name, **({"listing": "s3"} if listing else {})}
    for m in raw["models"].values():
        m["urls"][name] = f"{base_url}/{m['urls']['mirror'].split('}/', 1)[1]}"
    return build_catalog(raw)


# -- tampered sources: the .idx is a pointer, never proof ---------------------------------------


def swapped_idx_lines(world: World) -> Outcome:
    idx = _idx(world, 1)
    world.replace(idx, _swap_fields(idx.read_text(), ":TMP:2 m above ground:", ":UGRD:10 m above ground:"))
    with world.serve() as server:
        return refused(MessageMismatch, lambda: world.ingest(server, 1), "the message itself is UGRD:10 m above ground",
                       "not hrrr t2m", hours=(("hrrr", HRRR_RUN, 1),))


def other_hours_file(world: World) -> Outcome:
    for suffix in ("", ".idx"):
        src, dest = world.mirror_file("hrrr", HRRR_RUN, 1, suffix), world.mirror_file("hrrr", HRRR_RUN, 2, suffix)
        dest.unlink()
        os.link(src, dest)
    with world.serve() as server:
        return refused(MessageMismatch, lambda: world.ingest(server, 2), "forecast time is hour 1, not hour 2",
                       hours=(("hrrr", HRRR_RUN, 2),))


def other_runs_file(world: World) -> Outcome:
    later = "20260512_12"
    for suffix in ("", ".idx"):
        src, dest = world.mirror_file("gfs", GFS_RUN, 1, suffix), world.mirror_file("gfs", later, 1, suffix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dest)
    with world.serve() as server:
        return refused(MessageMismatch, lambda: world.ingest(server, 1, model="gfs", run=later),
                       "reference time is 2026-05-12 06:00Z, not the run 2026-05-12 12:00Z", hours=(("gfs", later, 1),))


def wrong_accumulation(world: World) -> Outcome:
    idx = _idx(world, 2)
    world.replace(idx, _swap_fields(idx.read_text(), ":APCP:surface:0-2 hour acc fcst:", ":APCP:surface:1-2 hour acc fcst:"))
    with world.serve() as server:
        return refused(MessageMismatch, lambda: world.ingest(server, 2, variables=["apcp"]), "1-2 hour acc fcst",
                       hours=(("hrrr", HRRR_RUN, 2),))


def wrong_file_without_idx(world: World) -> Outcome:
    one, two = world.mirror_file("hrrr", HRRR_RUN, 1), world.mirror_file("hrrr", HRRR_RUN, 2)
    two.unlink()
    os.link(one, two)
    _idx(world, 2).unlink()
    with world.serve() as server:
        return refused(MessageMismatch, lambda: world.ingest(server, 2), "local index says",
                       hours=(("hrrr", HRRR_RUN, 2),))


# -- dead sources: unreachable is not "not published" -------------------------------------------


def connection_refused(world: World) -> Outcome:
    dead = f"http://127.0.0.1:{_free_port()}"
    return refused(SourceUnreachable, lambda: world.ingest(
        None, 1, settings=SourceSettings(order=("dead",)), catalog=_with_source("dead", dead)),  # type: ignore[arg-type]
        "unreachable", "connection refused", hours=(("hrrr", HRRR_RUN, 1),))


def dns_failure(world: World) -> Outcome:
    return refused(SourceUnreachable, lambda: world.ingest(
        None, 1, settings=SourceSettings(order=("nodns",)), catalog=_with_source("nodns", "http://noaa.invalid")),  # type: ignore[arg-type]
        "DNS lookup failed for noaa.invalid", hours=(("hrrr", HRRR_RUN, 1),))


def connect_timeout(world: World) -> Outcome:
    with _blackhole() as port:
        client = world.client(connect_timeout=2.0)
        return refused(SourceUnreachable, lambda: world.ingest(
            None, 1, client=client, settings=SourceSettings(order=("hole",)),  # type: ignore[arg-type]
            catalog=_with_source("hole", f"http://127.0.0.1:{port}")), "connect timed out",
            hours=(("hrrr", HRRR_RUN, 1),))


def fails_over(world: World) -> Outcome:
    catalog = _with_source("dead", f"http://127.0.0.1:{_free_port()}")
    with world.serve() as server:
        settings = SourceSettings(order=("dead", "mirror"), mirror_url=server.url)
        return survived(lambda: world.ingest(server, 1, settings=settings, catalog=catalog),
                        lambda r: None if r.source == "mirror" and "dead" in r.sources_failed else f"source {r.source}",
                        "failed over to the next source and ingested the hour")


def gaps_plan_dead(world: World) -> Outcome:
    """The CLI, as an operator runs it: exits 3 naming the host, well within a minute."""
    from weather_pipeline.orchestration.local_daemon import BIN

    home = world.base / "home"
    home.mkdir(exist_ok=True)
    dead = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "DAGSTER_HOME": str(home), "WEATHER_PIPELINE_SOURCES": "mirror",
           "WEATHER_PIPELINE_MIRROR_URL": dead, "WEATHER_PIPELINE_CACHE": str(world.cache.root)}
    t0 = time.monotonic()
    done = subprocess.run([str(BIN / "weather-pipeline"), "gaps", "plan", "--model", "hrrr"], env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    line = next((x for x in done.stderr.splitlines() if x.startswith("weather-pipeline: error:")), done.stderr[-300:])
    ok = done.returncode == 3 and dead.split("//")[1] in line and "source has 0 h" not in done.stderr
    return Outcome(ok, f"exit {done.returncode}, the host named" if ok else f"exit {done.returncode}", line, seconds)


def scan_source_dead(world: World) -> Outcome:
    """ScanSource with a known run, then the source dies: unreachable recorded, knowledge kept."""
    from dagster import DagsterInstance, build_sensor_context

    from weather_pipeline.core.scan import load_availability, load_source_health
    from weather_pipeline.orchestration import sensors
    from weather_pipeline.orchestration.jobs import build_ingest_job
    from weather_pipeline.orchestration.resources import resources_from_env

    model = load_catalog().model("hrrr")
    clock = sensors.utcnow
    sensors.utcnow = lambda: NOW.replace(hour=2, minute=30)  # type: ignore[assignment]
    try:
        scan = sensors.build_scan_source_sensor(model, build_ingest_job(model))
        instance = DagsterInstance.ephemeral()

        def tick(url):
            resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": url,
                                            "WEATHER_PIPELINE_CACHE": str(world.cache.root),
                                            "WEATHER_PIPELINE_HTTP_BACKOFF_S": "0.05"})
            return scan(build_sensor_context(instance=instance, resources=resources))

        with world.serve() as server:
            tick(server.url)
        t0 = time.monotonic()
        result = tick(f"http://127.0.0.1:{_free_port()}")
        seconds = time.monotonic() - t0
    finally:
        sensors.utcnow = clock  # type: ignore[assignment]
    message = result.skip_reason.skip_message if result.skip_reason else "requested runs"
    kept = load_availability(world.cache, "hrrr").get(HRRR_RUN)
    health = load_source_health(world.cache, "hrrr").get("mirror")
    ok = (not result.run_requests and "SOURCE UNREACHABLE" in message and kept is not None and kept.hours == (0, 1, 2)
          and health is not None and not health.reachable)
    return Outcome(ok, "recorded unreachable, last known hours kept, nothing requested" if ok else "not as expected",
                   message, seconds)


# -- transfer faults: retried to success, or a clear failure ------------------------------------


def _fault_then_ingest(world: World, glob: str, mode: str, what: str, **fault) -> Outcome:
    with world.serve() as server:
        server.faults.add(glob, mode, **fault)
        return survived(lambda: world.ingest(server, 1), lambda r: None if r.retries >= 1 else "no retry seen", what)


def server_errors(world: World) -> Outcome:
    return _fault_then_ingest(world, "*wrfsfcf01.grib2", "status", "503s retried with backoff; ingested", code=503, times=2)


def long_retry_after(world: World) -> Outcome:
    with world.serve() as server:
        server.faults.add("*.idx", "status", code=503, retry_after=7200)
        return refused(SourceAsksToWait, lambda: world.ingest(server, 1), "asks to wait until",
                       hours=(("hrrr", HRRR_RUN, 1),), what="failed at once with the time to wait (not retried)")


def trickle(world: World) -> Outcome:
    with world.serve() as server:
        server.faults.add("*wrfsfcf01.grib2", "trickle", count=1, seconds=0.5, times=1)
        client = world.client(transfer_grace_s=3.0, min_transfer_rate=1e9)
        return survived(lambda: world.ingest(server, 1, client=client),
                        lambda r: None if r.retries >= 1 else "no retry", "stalled transfer cut at its deadline, retried")


def connection_reset(world: World) -> Outcome:
    return _fault_then_ingest(world, "*wrfsfcf01.grib2", "reset", "reset connection retried; ingested")


def truncated(world: World) -> Outcome:
    return _fault_then_ingest(world, "*wrfsfcf01.grib2", "truncate", "short body retried; ingested")


def corrupt_framing(world: World) -> Outcome:
    return _fault_then_ingest(world, "*wrfsfcf01.grib2", "corrupt", "corrupt body caught by the header checks, refetched",
                              count=1 << 30)


def corrupt_data_section(world: World) -> Outcome:
    """Ingest reads headers only; the tile build (the one decode) catches the damage, quarantines
    the GRIB, the hour is fetched again and tiled from good bytes."""
    from weather_pipeline.core.tiles import GribNeedsRefetch, build_hour

    def md5s(report) -> dict[str, str]:
        return {v.variable: v.md5 for v in report.variables}

    def ingest_tile_refetch_tile():
        with world.serve() as server:
            server.faults.add("*wrfsfcf01.grib2", "corrupt", count=16)
            first = world.ingest(server, 1, variables=["t2m"])
            try:
                build_hour("hrrr", HRRR_RUN, 1, world.cache, variables=["t2m"], regions=["kansas"],
                           expected_md5=md5s(first))
            except GribNeedsRefetch:
                again = world.ingest(server, 1, variables=["t2m"])
                return build_hour("hrrr", HRRR_RUN, 1, world.cache, variables=["t2m"], regions=["kansas"],
                                  expected_md5=md5s(again))
            raise AssertionError("the damaged GRIB was tiled")

    return survived(ingest_tile_refetch_tile, lambda r: None if r.built else "nothing built",
                    "damage inside the data section caught at the one decode (tile build), quarantined, refetched, tiled")


def persistent_corruption(world: World) -> Outcome:
    with world.serve() as server:
        server.faults.add("*wrfsfcf01.grib2", "corrupt", count=1 << 30, times=None)
        return refused(TransientError, lambda: world.ingest(server, 1), "content check failed",
                       hours=(("hrrr", HRRR_RUN, 1),), what="refused after the retries; nothing written")


def ignored_range(world: World) -> Outcome:
    with world.serve() as server:
        server.faults.add("*wrfsfcf01.grib2", "ignore_range", times=None)
        return refused(RangeIgnored, lambda: world.ingest(server, 1, allow_full_download=False), "ignored Range",
                       hours=(("hrrr", HRRR_RUN, 1),), what="refused without reading the whole file")


def redirect_elsewhere(world: World) -> Outcome:
    with world.serve() as server, MirrorServer(world.tampered_mirror()) as other:
        server.faults.add("*wrfsfcf01.grib2.idx", "redirect", times=None, location=other.url.replace("127.0.0.1", "localhost"))
        return refused(RedirectRefused, lambda: world.ingest(server, 1), "another host 'localhost' refused",
                       hours=(("hrrr", HRRR_RUN, 1),))


def grib_missing_beside_idx(world: World) -> Outcome:
    world.mirror_file("hrrr", HRRR_RUN, 1).unlink()
    with world.serve() as server:
        return refused(SourceInconsistent, lambda: world.ingest(server, 1), "the .idx is there but the GRIB is not",
                       hours=(("hrrr", HRRR_RUN, 1),), what="reported inconsistent, not 'not published'")


def range_past_end(world: World) -> Outcome:
    grib = world.mirror_file("hrrr", HRRR_RUN, 1)
    data = grib.read_bytes()
    world.replace(grib, data[: len(data) // 3])  # the .idx describes a longer file
    with world.serve() as server:
        return refused(FetchError, lambda: world.ingest(server, 1), "416 Range Not Satisfiable",
                       hours=(("hrrr", HRRR_RUN, 1),))


def enormous_range(world: World) -> Outcome:
    idx = _idx(world, 1)
    lines = idx.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if ":TMP:2 m above ground:" in line)
    nxt = lines[i + 1].split(":")
    nxt[1] = str(int(nxt[1]) + (1 << 30))
    world.replace(idx, "\n".join(lines[: i + 1] + [":".join(nxt)]) + "\n")
    with world.serve() as server:
        out = refused(IdxError, lambda: world.ingest(server, 1, variables=["t2m"]), "over the",
                      hours=(("hrrr", HRRR_RUN, 1),), what="refused before fetching a byte of it")
        if any(r.path.endswith(".grib2") for r in server.request_log):
            out.ok, out.outcome = False, "message bytes were fetched"
        return out


def reversed_idx(world: World) -> Outcome:
    world.replace(_idx(world, 1), "1:500:d=2026051200:REFC:entire atmosphere:1 hour fcst:\n"
                                  "2:100:d=2026051200:TMP:2 m above ground:1 hour fcst:\n")
    with world.serve() as server:
        return refused(IdxError, lambda: world.ingest(server, 1), "before the previous message",
                       hours=(("hrrr", HRRR_RUN, 1),))


def oversized_response(world: World) -> Outcome:
    big = "1:0:d=2026051200:REFC:entire atmosphere:1 hour fcst:\n" * 200_000  # ~10 MB
    world.replace(_idx(world, 1), big)
    with world.serve() as server:
        return refused(ResponseTooLarge, lambda: world.ingest(server, 1), "over the", hours=(("hrrr", HRRR_RUN, 1),))


# -- hostile input ------------------------------------------------------------------------------


def overlay_traversal(world: World) -> Outcome:
    overlay = world.base / "overlay.toml"
    overlay.write_text('[models.hrrr.variables."../../../../outside/X"]\nsearch = ":TMP:2 m above ground:"\n')

    def load():
        from weather_pipeline.core.catalog import _load

        return _load(str(overlay))

    return refused(CatalogError, load, "is not allowed", what="overlay refused at load; nothing written")


def run_key_traversal(world: World) -> Outcome:
    with world.serve() as server:
        return refused(InvalidRequest, lambda: world.ingest(server, 1, run="../../outside"), "malformed run key")


def overlay_bad_url(world: World) -> Outcome:
    raw = json.loads(json.dumps(load_catalog().raw, default=str))
    raw["models"]["hrrr"]["urls"]["aws"] = "file:///etc"
    return refused(CatalogError, lambda: build_catalog(raw), "must be http(s)")


def overlay_absurd_region(world: World) -> Outcome:
    raw = json.loads(json.dumps(load_catalog().raw, default=str))
    raw["regions"]["huge"] = {"bbox": [-180, -90, 180, 90], "resolutions": [0.0001], "models": ["gfs"]}
    return refused(CatalogError, lambda: build_catalog(raw), "over the limit")


# -- the disk -----------------------------------------------------------------------------------


@contextmanager
def _small_disk(world: World, size: int) -> Iterator[Path]:
    where = world.base / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def disk_full_ingest(world: World) -> Outcome:
    hour0 = sum(p.stat().st_size for p in world.cache.grib_paths_for_hour("hrrr", HRRR_RUN, 0).values())
    with _small_disk(world, int(hour0 * 1.5)) as disk:
        small = World(world.base / "small", world.mirror_root)
        small.cache = CacheLayout(disk)
        with world.serve(world.mirror_root) as server:
            small.ingest(server, 0)
            from weather_pipeline.faults.harness import lost_files, partial_files, snapshot

            before = snapshot(small.cache)
            out = refused(CacheWriteError, lambda: small.ingest(server, 1), "the disk is full", "bytes free",
                          what="refused naming the file and the space left")
            out.partial_extra = len(partial_files(small, (("hrrr", HRRR_RUN, 1),)))
            if lost_files(before, snapshot(small.cache)):
                out.ok, out.outcome = False, "a good file was lost"
        return out


def disk_full_tiles(world: World) -> Outcome:
    from weather_pipeline.core.tiles import build_hour

    gribs = sum(p.stat().st_size for p in world.cache.gribs_root.rglob("*.grib2"))
    weights = sum(p.stat().st_size for p in world.cache.weights_dir.rglob("*") if p.is_file())
    with _small_disk(world, int(gribs * 2 + weights + (4 << 20))) as disk:
        small = World(world.base / "small", world.mirror_root)
        small.cache = CacheLayout(disk)
        with world.serve(world.mirror_root) as server:
            small.ingest(server, 1)
        from weather_pipeline.faults.harness import partial_files

        out = refused(CacheWriteError, lambda: build_hour("hrrr", HRRR_RUN, 1, small.cache), "the disk is full",
                      what="refused; no tile without its sidecar, no temp file")
        out.partial_extra = len(partial_files(small, ()))
        return out


# -- a damaged cache ----------------------------------------------------------------------------


def damaged_weights(world: World) -> Outcome:
    from weather_pipeline.core.tiles import build_hour

    with world.serve() as server:
        world.ingest(server, 1)
    damaged = list(world.cache.weights_dir.glob("*.npz"))
    for path in damaged:
        world.replace(path, b"PK\x03\x04 not really a zip")
    return survived(lambda: build_hour("hrrr", HRRR_RUN, 1, world.cache, regions=["kansas"]),
                    lambda r: None if r.built and damaged else "nothing built",
                    f"{len(damaged)} damaged weights files rebuilt, tiles built")


def grib_changed_before_tiling(world: World) -> Outcome:
    from weather_pipeline.core.cache import md5_file
    from weather_pipeline.core.tiles import GribNeedsRefetch, build_hour

    with world.serve() as server:
        world.ingest(server, 1)
    gribs = world.cache.grib_paths_for_hour("hrrr", HRRR_RUN, 1)
    recorded = {v: md5_file(p) for v, p in gribs.items()}
    world.replace(gribs["t2m"], gribs["mslp"].read_bytes())  # by hand: another field's bytes
    out = refused(GribNeedsRefetch, lambda: build_hour("hrrr", HRRR_RUN, 1, world.cache, regions=["kansas"],
                                                       expected_md5=recorded),
                  "is not the GRIB the ingest verified", what="refused before tiling; GRIB quarantined")
    if not world.cache.quarantine_path(gribs["t2m"]).is_file():
        out.ok, out.outcome = False, "not quarantined"
    return out


def damaged_cache_repaired(world: World) -> Outcome:
    """Deleted GRIB + altered tile + deleted sidecar: the verify_cache checks name them; the
    repair (re-materialization) brings every file back and the checks pass again."""
    from dagster import DagsterInstance, Definitions, materialize

    from weather_pipeline.orchestration.assets import grib_only, tiles_only
    from weather_pipeline.orchestration import integrity
    from weather_pipeline.orchestration.partitions import partition_key
    from weather_pipeline.orchestration.resources import resources_from_env

    model = load_catalog().model("hrrr")
    cache = CacheLayout(world.base / "dcache")
    real_recent = integrity._recent
    integrity._recent = lambda keys, m, now: real_recent(keys, m, NOW)  # type: ignore[assignment]
    try:
        with world.serve(world.mirror_root) as server:
            resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": server.url,
                                            "WEATHER_PIPELINE_CACHE": str(cache.root), "WEATHER_PIPELINE_KEEP_GRIBS": "hrrr"})
            instance = DagsterInstance.ephemeral()
            instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
            grib, tiles = grib_only(model), tiles_only(model)
            tags = {"dagster/asset_partition_range_start": str(partition_key(HRRR_RUN, 0)),
                    "dagster/asset_partition_range_end": str(partition_key(HRRR_RUN, 1))}
            for asset in (grib, tiles):
                materialize(**asset, instance=instance, resources=resources, tags=tags)
            defs = Definitions(assets=grib["assets"], asset_checks=integrity.build_cache_checks(model),
                               jobs=[integrity.build_verify_cache_job([model])], resources=resources)

            def verify():
                result = defs.resolve_job_def("verify_cache").execute_in_process(instance=instance)
                return {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}

            verify()
            lost = cache.grib_path("hrrr", HRRR_RUN, "mslp", 0)
            lost.unlink()
            tile = cache.tile_path("kansas", 0.25, "hrrr", HRRR_RUN, "t2m", 1)
            with np.load(tile) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["data"] = arrays["data"] + np.float32(5)
            tile.unlink()
            with open(tile, "wb") as fh:
                np.savez(fh, **arrays)
            side = sidecar_path(cache.tile_path("conus", 0.25, "hrrr", HRRR_RUN, "u10", 1))
            side.unlink()
            t0 = time.monotonic()
            checks = verify()
            named = json.dumps({k: v.metadata["damaged"].value for k, v in checks.items()})
            found = all(str(p) in named for p in (lost, tile, side))
            seconds = time.monotonic() - t0
            materialize(**grib, instance=instance, resources=resources, partition_key=str(partition_key(HRRR_RUN, 0)))
            materialize(**tiles, instance=instance, resources=resources, tags=tags)
            after = verify()
    finally:
        integrity._recent = real_recent  # type: ignore[assignment]
    repaired = all(e.passed for e in after.values()) and lost.is_file() and tile.is_file() and side.is_file()
    ok = found and repaired and not any(e.passed for e in checks.values())
    return Outcome(ok, "checks named all 3 files; re-materialization repaired them" if ok else
                   f"found {found}, repaired {repaired}", checks["tiles_match_sidecars"].description or "", seconds)


def partial_batch(world: World) -> Outcome:
    """A 3-hour batch whose middle hour fails: the other two are materialized with metadata."""
    from dagster import AssetKey, DagsterInstance, materialize

    from weather_pipeline.orchestration.assets import grib_only
    from weather_pipeline.orchestration.partitions import model_partitions, partition_key
    from weather_pipeline.orchestration.resources import resources_from_env

    model = load_catalog().model("hrrr")
    idx = _idx(world, 1)
    world.replace(idx, _swap_fields(idx.read_text(), ":TMP:2 m above ground:", ":UGRD:10 m above ground:"))
    with world.serve() as server:
        resources = resources_from_env({"WEATHER_PIPELINE_SOURCES": "mirror", "WEATHER_PIPELINE_MIRROR_URL": server.url,
                                        "WEATHER_PIPELINE_CACHE": str(world.cache.root)})
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("hrrr_runs", [HRRR_RUN])
        keys = [str(partition_key(HRRR_RUN, h)) for h in (0, 1, 2)]
        t0 = time.monotonic()
        result = materialize(**grib_only(model), instance=instance, resources=resources, raise_on_error=False,
                             tags={"dagster/asset_partition_range_start": keys[0],
                                   "dagster/asset_partition_range_end": keys[-1]})
        seconds = time.monotonic() - t0
    status = instance.get_status_by_partition(AssetKey("hrrr_grib"), keys, model_partitions(model))
    got = [status[k].value for k in keys]
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    retried = [e for e in instance.all_logs(result.run_id) if "trying them again" in (e.message or "")]
    ok = got == ["MATERIALIZED", "FAILED", "MATERIALIZED"] and not retried
    return Outcome(ok, "hours 0 and 2 materialized, hour 1 failed with its reason, not retried" if ok else f"{got}",
                   failure.step_failure_data.user_failure_data.description, seconds,
                   refused_hours=(("hrrr", HRRR_RUN, 1),))


def concurrent_writers(world: World) -> Outcome:
    import threading

    reports, errors = [], []
    with world.serve() as server:
        server.faults.add("*wrfsfcf01.grib2", "delay", seconds=0.5, times=None)

        def go():
            try:
                reports.append(world.ingest(server, 1))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        t0 = time.monotonic()
        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        seconds = time.monotonic() - t0
    same = len(reports) == 2 and {v.variable: v.md5 for v in reports[0].variables} == \
        {v.variable: v.md5 for v in reports[1].variables}
    ok = not errors and same and reports[1].requests == 0
    return Outcome(ok, "the second writer waited for the first and reused its files" if ok else f"{errors}",
                   f"second: {reports[1].index}" if len(reports) == 2 else str(errors), seconds)


FAST_CASES = [
    Case("idx lines name the wrong messages", "`.idx` with the TMP:2 m and UGRD:10 m lines swapped", swapped_idx_lines),
    Case("another hour's file", "hour 1's GRIB and `.idx` served at hour 2's URL", other_hours_file),
    Case("another run's file", "GFS 06z f001 served as the 12z run's f001", other_runs_file),
    Case("wrong accumulation", "`.idx` naming the 1-2 h APCP bucket as the 0-2 h run total", wrong_accumulation),
    Case("wrong file, no `.idx`", "no `.idx`; hour 1's GRIB at hour 2's URL (local index)", wrong_file_without_idx),
    Case("connection refused", "the only source refuses connections", connection_refused),
    Case("no DNS", "the only source's host name does not resolve", dns_failure),
    Case("connect timeout", "the only source drops SYNs (full listen queue), connect timeout 2 s", connect_timeout),
    Case("failover", "the first source refuses connections, the second works", fails_over),
    Case("gaps plan, dead source", "`weather-pipeline gaps plan` (48 runs) against a refusing source", gaps_plan_dead),
    Case("ScanSource, dead source", "a sensor tick after the source died", scan_source_dead),
    Case("server errors", "two HTTP 503 on the GRIB ranges", server_errors),
    Case("Retry-After 2 h", "HTTP 503 with Retry-After: 7200 on the `.idx`", long_retry_after),
    Case("trickling body", "GRIB body at 1 byte per 0.5 s (transfer deadline 3 s)", trickle),
    Case("connection reset", "TCP reset instead of an answer, once", connection_reset),
    Case("truncated body", "half the GRIB range, then the connection closes", truncated),
    Case("corrupt body", "every byte of a GRIB range flipped", corrupt_framing),
    Case("corrupt data section", "16 bytes flipped inside the t2m data section (headers intact)", corrupt_data_section),
    Case("persistent corruption", "every GRIB range corrupted", persistent_corruption),
    Case("Range ignored", "200 and the whole file for every Range request", ignored_range),
    Case("redirect to another host", "302 to another host for the `.idx`", redirect_elsewhere),
    Case("GRIB missing beside its `.idx`", "the `.idx` is served, the GRIB is a 404", grib_missing_beside_idx),
    Case("file shorter than its `.idx`", "GRIB truncated to a third on the server (416)", range_past_end),
    Case("enormous `.idx` range", "a message claimed to be 1 GB long", enormous_range),
    Case("reversed `.idx` offsets", "offsets going backwards", reversed_idx),
    Case("oversized response", "a 10 MB `.idx` (cap 4 MB)", oversized_response),
    Case("catalog path traversal", "overlay variable named `../../../../outside/X`", overlay_traversal, seed=False),
    Case("run key traversal", "run key `../../outside`", run_key_traversal, seed=False),
    Case("catalog URL scheme", "overlay URL `file:///etc`", overlay_bad_url, seed=False),
    Case("absurd region", "overlay region of 10^13 points", overlay_absurd_region, seed=False),
    Case("disk full, ingest", "cache on a tmpfs with room for 1.5 hours", disk_full_ingest),
    Case("disk full, tiles", "cache on a tmpfs without room for the CONUS tiles", disk_full_tiles),
    Case("damaged regrid weights", "weights file replaced by garbage (BadZipFile)", damaged_weights),
    Case("GRIB changed before tiling", "a cached GRIB replaced by another field's bytes", grib_changed_before_tiling),
    Case("damaged cache", "a GRIB deleted, a tile altered, a sidecar deleted by hand", damaged_cache_repaired, seed=False),
    Case("partial batch", "the middle hour of a 3-hour batch has a wrong `.idx`", partial_batch),
    Case("two writers of one hour", "two ingests of the same hour at once", concurrent_writers),
]
