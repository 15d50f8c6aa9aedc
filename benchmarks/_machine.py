"""How busy the machine was during a timing: shared by the benchmark scripts."""

from __future__ import annotations

import os
import time


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process); None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def other_cpu_share(a: tuple[float, float, float] | None, b: tuple[float, float, float] | None) -> float | None:
    """Fraction of all CPUs' time between two snapshots used by other processes (None if unknown)."""
    if a is None or b is None:
        return None
    wall = max(b[0] - a[0], 1e-9)
    return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / (wall * (os.cpu_count() or 1))
