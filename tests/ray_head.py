"""Start and stop a private Ray head for the integration tests that need their own cluster.

Some tests cannot use the shared `ray_cluster` fixture (it has no dashboard, and a process can
drive only one Ray cluster). They run `ray start --head --block` in a new session with a private
temp dir, so every process of that cluster (GCS, raylets, autoscaler, workers) is in its process
group or names that temp dir. Stopping sends SIGTERM to that `ray start` (Ray's own graceful
shutdown of the head, without its node drain), then SIGKILLs whatever is left in the process
group and any process naming the temp dir. Never `ray stop`: it would stop every Ray cluster
on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 1.0):
    """Polls `predicate` until it returns a truthy value (returned), else AssertionError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def processes_of(temp_dir: str, pgid: int) -> list:
    """Processes of this head only: in its process group, or naming its temp dir."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            in_group = os.getpgid(proc.info["pid"]) == pgid
            names_dir = temp_dir in " ".join(proc.info["cmdline"] or [])
        except (ProcessLookupError, psutil.Error):
            continue
        if (in_group or names_dir) and proc.info["pid"] != os.getpid():
            mine.append(proc)
    return mine


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's `ray start --block` (graceful), then SIGKILL its leftovers."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    kill_all(processes_of(temp_dir, head.pid))


def kill_all(processes: list) -> None:
    """Kill ``processes`` (psutil handles; those already gone are skipped) and wait for them."""
    import psutil

    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def head_log(temp_dir: str) -> Path:
    return Path(temp_dir) / "head.log"


def check_head_alive(head: subprocess.Popen, temp_dir: str) -> None:
    """Raises AssertionError with the head's log if `ray start` has exited."""
    if head.poll() is not None:
        raise AssertionError(f"ray start exited: {head_log(temp_dir).read_text()}")


@contextlib.contextmanager
def running_head(temp_dir: str, head_args: list[str], env: dict[str, str]) -> Iterator:
    """Runs `ray start --head --block --temp-dir=<temp_dir> <head_args>` in a new session,
    logging to <temp_dir>/head.log; yields the process; always stops it and deletes temp_dir.

    temp_dir must be short (Ray's unix socket paths under it are limited to ~107 bytes)."""
    cmd = [str(RAY_BIN), "start", "--head", "--block", f"--temp-dir={temp_dir}", *head_args]
    # On SIGTERM Ray first drains the node for up to 30 s (time for Serve proxies to hand off
    # traffic); a test head serves nobody, so skip straight to its graceful process shutdown.
    env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    try:
        with open(head_log(temp_dir), "w") as log:
            head = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                yield head
            finally:
                stop_head(head, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
