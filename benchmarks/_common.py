"""Shared by the benchmark scripts: how busy the machine was, and the result tables."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field


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


@dataclass
class Table:
    """A result table, rendered as aligned text or Markdown; the first ``left`` columns are labels."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""
    left: int = 1

    def render(self, markdown: bool) -> str:
        if not self.header:
            return (f"### {self.title}\n\n{self.note}\n" if markdown else self.note + "\n")
        if markdown:
            out = [f"### {self.title}", ""] + ([self.note, ""] if self.note else [])
            out.append("| " + " | ".join(self.header) + " |")
            out.append("|" + "|".join("---" if i < self.left else "---:" for i in range(len(self.header))) + "|")
            out += ["| " + " | ".join(r) + " |" for r in self.rows]
            return "\n".join(out) + "\n"
        widths = [max(len(str(c)) for c in col) for col in zip(self.header, *self.rows)]

        def line(r: list[str]) -> str:
            return "  ".join(str(c).ljust(wd) if i < self.left else str(c).rjust(wd)
                             for i, (c, wd) in enumerate(zip(r, widths)))

        out = [f"== {self.title} =="] + ([self.note] if self.note else []) + [line(self.header)]
        out += [line(r) for r in self.rows]
        return "\n".join(out) + "\n"
