"""Smoke test of benchmarks/bench_core.py: it runs and prints its ratio tables (no timing asserts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorly")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_core_quick_runs():
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "bench_core.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for title in ("== Reconstruction", "== HOSVD", "== HOOI", "== Gradients", "== Targets"):
        assert title in out, title
    # ratio columns and per-target ratio lines
    assert "tensorly/ours" in out and "naive/ours" in out and "autograd/vjp(numpy)" in out
    assert out.count("x (target >=") >= 4
    assert "reconstruction fwd+bwd vs tucker_to_tensor" in out
    assert "HOSVD time vs tensorly numpy" in out
    assert "faster than tensorly at" in out and "the speed of torch autograd" in out
