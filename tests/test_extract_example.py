"""Smoke test of docs/examples/extract_crnn.py on synthetic deltas (the real run needs khmer-ocr-ocm and minutes)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Trying to compute SVD")

PATH = Path(__file__).resolve().parents[1] / "docs" / "examples" / "extract_crnn.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("extract_crnn_example", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_module_imports_without_torch_or_the_model_package(example):
    src = PATH.read_text()
    head = src[: src.index("def ")]
    assert "import torch" not in head and "khmer_ocr_ocm" not in head.split('"""')[-1]


def test_extract_table_and_plot_on_synthetic_updates(example, tmp_path):
    rng = np.random.default_rng(0)
    # A conv update with channel structure, and a matrix update.
    conv = np.einsum("ab,ia,jb->ij", rng.standard_normal((3, 3)), rng.standard_normal((16, 3)),
                     rng.standard_normal((8 * 9, 3))).reshape(16, 8, 3, 3) + 0.01 * rng.standard_normal((16, 8, 3, 3))
    deltas = {"conv": conv, "fc": rng.standard_normal((12, 10)), "tiny": np.ones((2, 2))}
    rows = example.extract(deltas, lora_ranks=(1, 3, 64), steps=2, min_size=10)
    assert {r["layer"] for r in rows} == {"conv", "fc"}
    assert {r["lora_rank"] for r in rows} == {1, 3}  # 64 exceeds both layers' maximum rank
    for r in rows:
        assert r["num_params"] <= r["budget"] and 0 < r["fraction"] < 1
        assert math.isnan(r["rel_error"]) or 0 <= r["rel_error"] <= 1 + 1e-12
    # The rank-3 conv update is captured by LoRA at rank 3 up to the noise.
    lora3 = next(r for r in rows if r["layer"] == "conv" and r["kind"] == "lora" and r["lora_rank"] == 3)
    assert lora3["rel_error"] < 0.05
    table = example.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| layer | shape | budget") and len(lines) == 2 + 4
    assert "**" in lines[2] and "16×8×3×3" in table
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    assert example.plot(rows, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_edit_distance(example):
    assert example._edit_distance("kitten", "sitting") == 3
    assert example._edit_distance("", "abc") == 3
