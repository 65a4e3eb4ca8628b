"""Compile the native CPU kernels (cpu_kernels.cpp, decode_matmul.cpp) once per machine; load them.

Built with the system C++ compiler (`$CXX`, default g++) at -O3 -march=native, so the library is
cached per source, flags and CPU under $LLMAAS_HOME/kernels/. No compiler, a failed build or
LLMAAS_CPU_KERNELS=0 leaves the engine on plain torch ops (same results up to rounding), with one
log line saying why.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from llmaas.cpu_info import cpu_flags, cpu_model
from llmaas.paths import llmaas_home

log = logging.getLogger("llmaas.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.cpp", "decode_matmul.cpp")]
# -fopenmp: the parallel loops of the matmuls and of decode attention. The library then needs
# libgomp.so.1, which resolves to the copy torch has already loaded (same soname), so it runs on
# torch's thread pool, not on a second one.
OPENMP = "-fopenmp"
FLAGS = [
    "-O3",
    "-march=native",
    OPENMP,
    "-fno-trapping-math",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
]
ABI = 7  # llmaas_kernels_abi() of the source this Python code expects


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++")


def library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES), " ".join(FLAGS).encode(), compiler.encode()):
        key.update(part)
    key.update(f"{cpu_model()} {sorted(cpu_flags())}".encode())
    return llmaas_home() / "kernels" / key.hexdigest()[:16] / "libllmaas_cpu_kernels.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several processes start at once
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        sources = [str(source) for source in SOURCES]
        try:
            try:
                subprocess.run(
                    [compiler, *FLAGS, "-o", tmp, *sources], check=True, capture_output=True, text=True
                )
            except subprocess.CalledProcessError as err:
                # A compiler without OpenMP (clang without libomp): the same kernels on one thread.
                log.info("building with %s failed, retrying without it: %s", OPENMP, err.stderr[-500:])
                serial = [flag for flag in FLAGS if flag != OPENMP] + ["-fopenmp-simd"]
                subprocess.run(
                    [compiler, *serial, "-o", tmp, *sources], check=True, capture_output=True, text=True
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@functools.cache
def load_cpu_kernels() -> ctypes.PyDLL | None:
    """The compiled library, or None (with the reason logged once) when it cannot be had."""
    if os.environ.get("LLMAAS_CPU_KERNELS", "1") == "0":
        log.info("native CPU kernels off (LLMAAS_CPU_KERNELS=0); using torch ops")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (g++ or $CXX) found; decode uses torch ops, which are slower")
        return None
    target = library_path(compiler)
    try:
        if not target.exists():
            log.info("building native CPU kernels with %s (once per machine, a few seconds)", compiler)
            _compile(compiler, target)
        # PyDLL keeps the GIL across a call: the kernels take microseconds, and releasing and retaking
        # the GIL a hundred times a step would let the server's event loop thread delay the engine.
        lib = ctypes.PyDLL(str(target))
        if lib.llmaas_kernels_abi() != ABI:
            raise OSError(f"{target} has ABI {lib.llmaas_kernels_abi()}, expected {ABI}")
    except subprocess.CalledProcessError as err:
        log.warning("building native CPU kernels failed; using torch ops:\n%s", err.stderr[-2000:])
        return None
    except OSError as err:
        log.warning("loading native CPU kernels failed (%s); using torch ops", err)
        return None
    return lib
