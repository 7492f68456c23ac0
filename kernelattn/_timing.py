"""Timing helpers shared by the command line and the benchmark script.

Times are medians of repeated calls after a warm-up call, with each library's
asynchronous work completed inside the timed region.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

from . import _compat, _dispatch


#: glibc settings under which freed memory is kept for reuse. With the defaults a temporary above a
#: moving threshold (and any output of 32 MiB or more) gets fresh pages, faulted in again on every call;
#: which case pays, and how much, depends on the process' history and the machine (on the project's VM the
#: same non-causal forward took 48 ms in one call and 98 ms in another, all of it in first writes)
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
                 "MALLOC_TOP_PAD_": str(1 << 28)}


def malloc_pinned() -> bool:
    """Whether this process runs with :data:`STEADY_MALLOC`."""
    return all(os.environ.get(name) == value for name, value in STEADY_MALLOC.items())


def rerun_with_steady_malloc(script: str, *, keep_system: bool) -> str:
    """Re-exec ``script`` with :data:`STEADY_MALLOC` (Linux, unless ``keep_system`` or already set); say which.

    glibc reads these variables once, at start-up: only a new process gets them.
    """
    if not (keep_system or malloc_pinned()) and sys.platform.startswith("linux"):
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]],
                  {**os.environ, **STEADY_MALLOC})
    return ("malloc: glibc's thresholds pinned (STEADY_MALLOC): temporaries and outputs reuse freed memory"
            if malloc_pinned() else "malloc: the system's defaults")


def block(x):
    """Wait until ``x`` (any supported array, or a tuple of them) is computed."""
    if isinstance(x, tuple):
        for item in x:
            block(item)
        return x
    if not _compat.is_array_api_obj(x):
        return x
    adapter = _dispatch.adapter_for(_compat.library_name(_compat.array_namespace(x)))
    return x if adapter is None else adapter.block(x)


def median_time(fn, *, repeats: int = 3, warmup: int = 1, budget: float | None = None) -> float:
    """Median wall time of ``fn()`` in seconds (stops early past ``budget`` seconds)."""
    for _ in range(warmup):
        block(fn())
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
        if budget is not None and time.perf_counter() - start > budget:
            break
    return statistics.median(times)


def crossover(sizes, slow, fast):
    """Smallest N from which ``fast`` stays faster than ``slow`` (log-log interpolated).

    ``slow`` and ``fast`` are times per size (None where not measured). Returns
    ``(n, exact)``: ``n`` None if ``fast`` never wins; ``exact`` False when it
    already wins at the first size (so the crossover is at most that size).
    """
    pairs = [(n, s, f) for n, s, f in zip(sizes, slow, fast) if s is not None and f is not None]
    if not pairs:
        return None, False
    wins = [f < s for _, s, f in pairs]
    if all(wins):
        return pairs[0][0], False
    if not wins[-1]:
        return None, True
    i = max(j for j, w in enumerate(wins) if not w)  # last loss; it wins from i + 1 on
    (n0, s0, f0), (n1, s1, f1) = pairs[i], pairs[i + 1]
    r0, r1 = math.log(f0 / s0), math.log(f1 / s1)  # log ratio crosses 0 between n0 and n1
    t = r0 / (r0 - r1)
    return int(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))), True


def crossover_text(sizes, slow, fast, *, unicode: bool = False) -> str:
    """:func:`crossover` in words: "N ~ 412", "N <= 256 (faster at every size measured)", or "not reached"."""
    n, exact = crossover(sizes, slow, fast)
    le, approx = ("≤", "≈") if unicode else ("<=", "~")
    if n is None:
        return f"not reached up to N={sizes[-1]}"
    return f"N {approx} {n}" if exact else f"N {le} {n} (faster at every size measured)"
