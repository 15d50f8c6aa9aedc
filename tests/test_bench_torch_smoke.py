"""Smoke test of benchmarks/bench_torch.py: it runs and prints every method's row (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _ours() -> bool:
    try:
        from tucker_peft.backends.torch import AdapterConfig, inject, merge, merge_and_unload  # noqa: F401
    except Exception:
        return False
    return True


def expected_rows() -> list[str]:
    rows = ["floor", "flora-official"]
    if _importable("peft"):
        rows.append("peft-lora")
    if _importable("lycoris"):
        rows += ["lycoris-locon-tucker", "lycoris-locon-tucker[bypass]"]
    if _ours():
        rows += ["tucker", "tucker[rebuild]", "tucker[factorized]", "tucker2", "cp", "lora"]
    return rows


def test_bench_torch_quick_runs(tmp_path):
    out_json = tmp_path / "bench.json"
    out_md = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "bench_torch.py"), "--quick",
         "--json", str(out_json), "--markdown", str(out_md)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    models = ["cnn"] + (["crnn"] if _importable("khmer_ocr_ocm") else [])
    rows = expected_rows()
    data = json.loads(out_json.read_text())
    assert sorted(data["models"]) == sorted(models)
    for model in models:
        for title in ("training step", "memory per training step", "trainable parameters per adapted layer",
                      "inference"):
            assert f"== {model}: {title}" in out, (model, title)
        section = out.split(f"== {model}: training step")[1].split("== ")[0]
        for row in rows:
            assert re.search(rf"^{re.escape(row)}\s+\d", section, re.MULTILINE), (model, row, section)
        got = data["models"][model]["methods"]
        assert set(rows) <= set(got), (model, sorted(set(rows) - set(got)))
        for name in rows:
            assert got[name]["step_median_s"] > 0
            assert got[name]["memory_bytes"]["step_peak"] > 0
            if name != "floor":  # equal budgets: never above LoRA r=8 on any layer
                layers = data["models"][model]["layers"]
                assert all(0 < got[name]["per_layer"][t] <= layers[t]["budget"] for t in layers), (model, name)
        if _ours():
            assert "tucker merged" in data["models"][model]["inference"]
    assert "== Targets ==" in out and "x floor" in out
    if _ours():
        assert out.count("[PASS]") + out.count("[FAIL]") >= 4 * len(models)
    assert "| method |" in out_md.read_text()
