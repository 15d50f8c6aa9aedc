"""benchmarks/gpu_check.sh and bench_gpu.py on a CPU machine: GPU parts skipped, harness exercised."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import gpu_available

ROOT = Path(__file__).resolve().parents[1]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


no_gpu_here = pytest.mark.skipif(gpu_available() or _cuda(), reason="a GPU is present: the script runs for real")


@no_gpu_here
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_script_skips_cleanly_without_gpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: skipped" in proc.stdout
    assert "tucker_peft" in proc.stdout and "imports OK" in proc.stdout
    log = (tmp_path / "gpu_check.log").read_text()
    assert "=== environment ===" in log and "no GPU: skipped" in log


@no_gpu_here
def test_bench_without_gpu_prints_the_skip_message():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no GPU: skipped", proc.stdout + proc.stderr


def test_bench_harness_on_cpu(tmp_path):
    # The GPU benchmark's code path, run on NumPy vs torch-CPU with one repetition.
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cpu", "--reps", "1",
                           "--dtype", "float64", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # a smoke run: one thread is enough
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["backends"] == ["numpy", "torch-cpu"]
    ops = {r["op"] for r in data["rows"]}
    assert {"reconstruct", "vjp", "vjp (autograd)"} <= ops
    assert any(op.startswith("fit tucker als") for op in ops) and any("cp als" in op for op in ops)
    # Same code on two libraries in float64: the results agree closely.
    diffs = [r["diff"] for r in data["rows"] if r["backend"] == "agreement"]
    assert diffs and max(diffs) < 1e-8
    assert "torch-cpu/numpy" in proc.stdout
