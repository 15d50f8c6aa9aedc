"""Smoke test of benchmarks/bench_compare_ab.py: two workers on this tree run and the ratio table prints
(no timing asserts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_compare_ab_runs_on_two_trees():
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "bench_compare_ab.py"), ".", ROOT, "--rounds", "1", "--steps",
         "1", "--batch", "2", "--kinds", "lora,cp"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("step time (") for ln in lines) == 2  # wall, then CPU
    rows = [ln.split() for ln in lines if ln.split()[:1] in (["lora"], ["cp"])]
    assert len(rows) == 4 and all(len(r) == 4 and float(r[3]) > 0 for r in rows)


def test_bench_compare_ab_needs_two_trees():
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_compare_ab.py"), "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "at least two code trees" in proc.stderr
