"""Run the Dagster daemon for a while from Python (demo, end-to-end test, benchmark).

The daemon runs the sensors and the schedule, dequeues runs and launches each in a subprocess,
exactly as in production. It is started in its own session with default signal handlers (a
non-interactive parent may hand down ignored SIGINT/SIGTERM, which Dagster would then ignore),
and stopped by signalling that session's process group only: the daemon and the run workers
it launched, nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

BIN = Path(sys.executable).parent
#: Dagster's gRPC calls (launching a run, evaluating a sensor) give up after 60 s by default,
#: which a loaded 2-core machine exceeds; the daemons we start wait three times as long.
GRPC_TIMEOUT_S = "180"


def _reset_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def start_daemon(env: Mapping[str, str], log_path: Path | None = None,
                 module: str = "weather_pipeline.definitions") -> subprocess.Popen:
    """Start `dagster-daemon run -m module` in its own session (stop it with stop_process_group)."""
    if "DAGSTER_HOME" not in env:
        raise ValueError("dagster_daemon needs DAGSTER_HOME in env")
    env = {"DAGSTER_GRPC_TIMEOUT_SECONDS": GRPC_TIMEOUT_S, **env}
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-m", module],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_reset_signals,
        )
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]  # the child has its own copy


@contextmanager
def dagster_daemon(env: Mapping[str, str], log_path: Path | None = None,
                   module: str = "weather_pipeline.definitions") -> Iterator[subprocess.Popen]:
    """`dagster-daemon run` on the code location, with `env` (DAGSTER_HOME and our settings)."""
    proc = start_daemon(env, log_path, module)
    try:
        yield proc
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL whatever is left after `timeout`."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    if pgid != proc.pid:  # not a group leader we made: signal only the process itself
        proc.terminate()
    else:
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL) if pgid == proc.pid else proc.kill()
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 1.0,
             on_wait: Callable[[], None] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if on_wait:
            on_wait()
        time.sleep(interval)
    return condition()
