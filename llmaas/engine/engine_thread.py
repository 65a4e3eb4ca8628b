"""A daemon thread that builds an engine and then serves it, so the model is loaded on the thread
that runs it (torch's OpenMP keeps a worker pool per thread: async_engine.py says what a model loaded
elsewhere costs)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def start_engine_thread(
    build: Callable[[], T], serve: Callable[[T], None], name: str
) -> tuple[threading.Thread, T]:
    """Run `serve(build())` on a new daemon thread; return (thread, engine) once built. A build error
    is raised here, after the thread has ended."""
    ready = threading.Event()
    built: dict[str, object] = {}

    def run() -> None:
        try:
            built["engine"] = build()
        except BaseException as exc:  # handed to the caller
            built["error"] = exc
            ready.set()
            return
        ready.set()
        serve(built["engine"])

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if "error" in built:
        thread.join()
        raise built["error"]
    return thread, built["engine"]
