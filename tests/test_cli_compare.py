"""``tucker-peft compare`` end to end on the tiny task (random conv net, synthetic data), and its argument errors."""

from __future__ import annotations

import csv
import json
import os

import pytest

torch = pytest.importorskip("torch")

from tucker_peft import cli
from tucker_peft.compare import BUILTIN_TASKS, DEFAULT_TASK

KINDS = ("tucker", "tucker2", "cp", "lora")


@pytest.fixture
def main(monkeypatch):
    """``cli.main`` with ``compare`` registered (whether or not the package lists it yet)."""
    if "_compare" not in cli.SUBCOMMANDS:
        monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, "_compare"])
    return cli.main


def test_compare_tiny_end_to_end(main, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["compare", "--task", "tiny", "--steps", "4", "--seeds", "2", "--lrs", "3e-3,3e-2",
                 "--budgets", "lora:1,lora:2", "--train-size", "32", "--val-size", "16", "--test-size", "16",
                 "--batch-size", "8", "--out", str(out), "-q"])
    assert code == 0
    # compare flushes denormals while it trains; that global CPU state must not leak to its caller
    assert torch.tensor(5e-324, dtype=torch.float64).mul(1.0).item() != 0.0
    printed = capsys.readouterr().out
    for k in KINDS:
        assert k in printed
    for name in ("results.json", "results.csv", "runs.csv", "results.png", "lr_sensitivity.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "tiny" and res["metric"] == "rel_mse" and res["higher_is_better"] is False
    summary = res["summary"]
    assert {(s["budget"], s["kind"]) for s in summary} == {(b, k) for b in ("lora:1", "lora:2") for k in KINDS}
    runs = res["runs"]
    assert len(runs) == 2 * 4 * 2 * 2  # budgets x kinds x lrs x seeds
    for s in summary:
        assert s["best_lr"] in (3e-3, 3e-2)
        assert s["seeds"] == 2 and len(s["test_per_seed"]) == 2
        assert all(t is not None for t in s["test_per_seed"])
        assert len(s["lr_curve"]) == 2
        # the test split is scored only for the selected lr
        others = [r for r in runs if (r["budget"], r["kind"]) == (s["budget"], s["kind"]) and r["lr"] != s["best_lr"]]
        assert others and all(r["test"] is None for r in others)

    # equal budget, layer by layer: no kind exceeds LoRA's count, and none is far below it
    for b in ("lora:1", "lora:2"):
        ref = next(s for s in summary if s["budget"] == b and s["kind"] == "lora")["layer_params"]
        assert len(ref) == 3  # the three convs of tiny-convnet
        for s in summary:
            if s["budget"] != b:
                continue
            assert s["layer_params"].keys() == ref.keys()
            for layer, n in s["layer_params"].items():
                assert 0.4 * ref[layer] <= n <= ref[layer], (b, s["kind"], layer, n, ref[layer])
            assert s["adapter_params"] == sum(s["layer_params"].values())
            assert s["head_params"] == 0

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["budget"], r["kind"]) for r in rows} == {(s["budget"], s["kind"]) for s in summary}
    for r in rows:
        s = next(s for s in summary if (s["budget"], s["kind"]) == (r["budget"], r["kind"]))
        assert int(r["adapter_params"]) == s["adapter_params"]
        assert float(r["test_mean"]) == pytest.approx(s["test_mean"])
    with open(out / "runs.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(runs)


@pytest.mark.parametrize("argv", [
    ["--kinds", "tucker,svd"],
    ["--budgets", "lora:0"],
    ["--lrs", "-1"],
    ["--task", "resnet"],
    ["--seeds", "0"],
    ["--lr", "bogus=1e-3"],
    ["--task", "tiny", "--shift", "inverted"],
    ["--task", "tiny", "--adapt", "3"],
])
def test_compare_bad_argument_exits_2_with_one_line(main, argv, tmp_path, capsys):
    code = main(["compare", *argv, "--out", str(tmp_path / "never")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tucker-peft: error: "), err
    assert not os.path.exists(tmp_path / "never")


def test_defaults_are_fair():
    """Every kind gets a learning-rate grid of the same size and span in every built-in task's settings."""
    from tucker_peft.compare.runner import _grids

    for name, cls in BUILTIN_TASKS.items():
        grids = list(_grids(cls, KINDS, None).values())
        assert len({len(g) for g in grids}) == 1, name
        assert len({round(g[-1] / g[0], 6) for g in grids}) == 1, name
    assert DEFAULT_TASK in BUILTIN_TASKS
