"""A server the benchmarks started in its own process group: waiting until it is ready, stopping it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group (`start_new_session=True`), SIGKILL it after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def wait_until_ready(
    proc: subprocess.Popen,
    url: str,
    log: Path,
    timeout_s: float = 300.0,
    paths: tuple[str, ...] = ("/health",),
    poll_s: float = 0.5,
) -> None:
    """Until every GET `url + path` answers 200. Raises RuntimeError naming the server's log (`log`)
    when the process exits first or `timeout_s` passes (the process is then stopped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: see {log}")
        try:
            if all(httpx.get(url + path, timeout=2.0).status_code == 200 for path in paths):
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    stop_process_group(proc)
    raise RuntimeError(f"the server did not become ready within {timeout_s:.0f}s: see {log}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
