"""How long torch's OpenMP threads spin before sleeping, set before torch loads.

libgomp's worker threads spin for a while after each parallel region, waiting for the next one. A
decode step runs hundreds of short regions with Python and our own native calls (one of which starts
a thread of its own) in between, and a long spin keeps a core busy that those need. Measured on
2 cores, batch-1 int4 decode of SmolLM2 (docs/performance.md): default spin ~82 tok/s,
GOMP_SPINCOUNT=10000 ~96, OMP_WAIT_POLICY=PASSIVE ~68. With another process busy on one core every
spinning policy suffers (default ~25, 10000 ~17) and PASSIVE holds up best (~57): set it yourself on a
shared machine. Anything the user already set wins.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"


def apply_openmp_defaults() -> None:
    """Call before the first `import torch` of the process; later calls change nothing in libgomp."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
