"""``tucker_peft.compare`` with cross-layer adapters: stacked variants (``K@layers``) as kinds of their own.

A tiny task written here (two blocks of two same-shape convs) stacks its four convs on (layer, role); the
parameter counts are checked against the kinds' closed forms and the summed budget, and the paired differences
against a recomputation from the runs.
"""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tucker_peft import TuckerPeftError, cli  # noqa: E402
from tucker_peft.compare import parse_reference, run  # noqa: E402

from .test_compare import ConvTask  # noqa: E402
from tucker_peft.compare.plots import variant_styles  # noqa: E402

C, K = 8, 3  # every adapted conv: (C, C, K, K)
MEMBER = C + C * K * K  # LoRA rank 1's parameter count on one conv (out + in·k·k)


class Blocks(nn.Module):
    """``blocks.<i>.a`` and ``blocks.<i>.b``: four (8, 8, 3, 3) convs, then pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Conv2d(C, C, K, padding=1),
                                                   "b": nn.Conv2d(C, C, K, padding=1)}) for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = torch.tanh(blk["b"](torch.tanh(blk["a"](x))))
        return x.mean(dim=(2, 3))


class StackTask(ConvTask):
    """A user's task with a stack: the four convs in one group, modes (layer, role); the rest as ConvTask."""

    name = "user-stack"
    target_modules = r"blocks\.\d+\.(a|b)"
    stack = {"convs": r"blocks\.(?P<layer>\d+)\.(?P<role>a|b)"}

    def prepare(self):
        g = torch.Generator().manual_seed(0)
        self.net = Blocks()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.x = torch.randn(64, C, 5, 5, generator=g)
            self.y = self.net(self.x) + 0.1 * torch.randn(64, C, generator=g)


STACKED = (2, 2, C, C, K, K)  # (layer, role, out, in, k, k)


def _ranks(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


def _closed_form(kind: str, ranks: list[int]) -> int:
    """Parameters of the kind on STACKED: Tucker core + factors; CP's R factor columns per mode (+ R weights)."""
    if kind == "tucker":
        return math.prod(ranks) + sum(n * r for n, r in zip(STACKED, ranks))
    (r,) = ranks
    return r * (sum(STACKED) + 1)


def _trainable(task, kind, budget):
    """The adapter parameters a run trains, counted on a model injected outside the runner."""
    from tucker_peft.backends.torch import AdapterConfig, inject

    m = task.build_model(0)
    base, _, stacked = kind.partition("@")
    inject(m, AdapterConfig(kind=base, budget=budget, target_modules=task.target_modules, init="zero",
                            **({"stack": task.stack} if stacked else {})))
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_stacked_rows_meet_the_summed_budget_with_the_groups_spec(tmp_path):
    task = StackTask()
    res = run(task, kinds=["tucker", "cp", "lora"], stack="layers", budgets=["lora:0.25", "lora:1"], seeds=2,
              out=str(tmp_path), quiet=True, threads=1)
    assert res.config["kinds"] == ["tucker", "cp", "lora", "tucker@layers", "cp@layers", "lora@layers"]
    assert res.config["stack"] == {"layers": StackTask.stack}
    rows = {(s["budget"], s["kind"]): s for s in res.summary}
    # lora:0.25 is 20 parameters per conv: below what any per-layer kind needs (Tucker (1,1,1,1): 23), while the
    # group's 4 x 20 = 80 fits a stacked Tucker/CP of ranks 1. LoRA on the stack cannot meet any budget.
    assert set(rows) == {("lora:0.25", "tucker@layers"), ("lora:0.25", "cp@layers"), ("lora:1", "tucker"),
                         ("lora:1", "cp"), ("lora:1", "lora"), ("lora:1", "tucker@layers"), ("lora:1", "cp@layers")}
    assert sum("no row" in n for n in res.notes) == 5
    for (budget, kind), s in rows.items():
        limit = 4 * float(budget[5:]) * MEMBER  # the sum over the 4 members of LoRA rank R's count
        assert 0 < s["adapter_params"] <= limit
        assert s["adapter_params"] == _trainable(task, kind, budget)
        if "@" in kind:
            [(group, ranks)] = s["ranks"].items()
            assert group.startswith("convs") and s["layer_params"][group] == s["adapter_params"]
            assert s["adapter_params"] == _closed_form(kind.partition("@")[0], _ranks(ranks))
        else:
            assert len(s["layer_params"]) == 4
    # the files carry the stacked rows
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {s["kind"] for s in saved["summary"]} >= {"tucker@layers", "cp@layers"}
    assert "tucker@layers" in (tmp_path / "results.csv").read_text()
    assert "| lora:0.25 | cp@layers |" in (tmp_path / "results.md").read_text()
    assert "tucker@layers" in res.table()
    assert (tmp_path / "budget_curve.png").stat().st_size > 0


def test_paired_differences_to_a_fixed_reference():
    res = run(StackTask(), kinds=["tucker@layers", "lora"], budgets=["lora:0.25", "lora:1"], seeds=3, lrs=[1e-2],
              reference="lora@lora:1", quiet=True, threads=1)
    assert res.config["kinds"] == ["tucker@layers", "lora"]  # stacked only: per-layer tucker is not run
    assert res.config["reference"] == "lora@lora:1"
    test = {(r["budget"], r["kind"], r["seed"]): r["test"] for r in res.runs if r["test"] is not None}
    for s in res.summary:
        if s["kind"] == "lora":
            assert s["vs_lora_mean"] is None  # the reference itself
            continue
        d = [test[(s["budget"], s["kind"], k)] - test[("lora:1", "lora", k)] for k in range(3)]
        assert s["vs_lora_mean"] == pytest.approx(sum(d) / 3)
        assert s["vs_lora_ci_low"] <= s["vs_lora_mean"] <= s["vs_lora_ci_high"]
    assert {s["budget"] for s in res.summary if s["vs_lora_mean"] is not None} == {"lora:0.25", "lora:1"}
    assert "vs lora@lora:1" in res.table()
    assert parse_reference("tt@layers") == ("tt@layers", None)
    assert parse_reference("tt@layers@lora:0.5") == ("tt@layers", "lora:0.5")
    with pytest.raises(TuckerPeftError, match="reference: expected one of the variants"):
        run(StackTask(), kinds=["tucker"], reference="lora@lora:1", quiet=True)


class HoleTask(StackTask):
    """blocks.1.b is not a target: the (layer, role) grid has a hole."""

    target_modules = r"blocks\.(0\.(a|b)|1\.a)"


def test_a_grid_error_in_the_task_stack_gives_one_clear_report():
    lines: list[str] = []
    with pytest.raises(TuckerPeftError) as info:
        run(HoleTask(), kinds=["tucker", "lora"], stack="layers", quiet=True, report=lines.append)
    msg = str(info.value)
    assert "\n" not in msg and "stack set 'layers'" in msg and "user-stack" in msg
    assert "missing" in msg and "layer=1, role=b" in msg
    assert lines == []
    # malformed stacks and unknown set names are refused before anything is prepared
    with pytest.raises(TuckerPeftError, match=r"stack set 'layers': .*invalid regex"):
        run(StackTask(), stack={"g": r"blocks\.(?P<layer>\d+"}, quiet=True)
    with pytest.raises(TuckerPeftError, match=r"has no stack set 'nope'; its stack sets are layers"):
        run(StackTask(), stack="nope", quiet=True)
    with pytest.raises(TuckerPeftError, match="has no stack set 'layers'; it has no stack"):
        run(type("NoStack", (StackTask,), {"stack": None})(), kinds=["tucker@layers"], quiet=True)


def test_cli_stack(tmp_path, monkeypatch, capsys):
    mod = tmp_path / "my_stack_task.py"
    mod.write_text(textwrap.dedent('''
        from tests.test_compare_stack import StackTask


        class MyTask(StackTask):
            name = "stack-from-a-file"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "res"
    code = cli.main(["compare", "--task", "my_stack_task:MyTask", "--kinds", "cp,lora", "--stack", "layers",
                     "--budgets", "lora:0.25,lora:1", "--seeds", "2", "--steps", "2", "--threads", "1",
                     "--reference", "lora@lora:1", "--no-plot", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["kinds"] == ["cp", "lora", "cp@layers", "lora@layers"]
    assert {(s["budget"], s["kind"]) for s in res["summary"]} == {("lora:0.25", "cp@layers"), ("lora:1", "cp"),
                                                                 ("lora:1", "lora"), ("lora:1", "cp@layers")}
    printed = capsys.readouterr().out
    assert "cp@layers" in printed and "vs lora@lora:1" in printed
    for argv, code in ((["--stack", "no such"], 2), (["--kinds", "tucker@"], 2), (["--reference", "nokind@lora:1"], 2),
                       (["--task", "my_stack_task:MyTask", "--stack", "missing"], 1)):
        assert cli.main(["compare", *argv, "--out", str(tmp_path / "never"), "-q"]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tucker-peft: error: "), err


def test_plot_styles_pair_a_kind_with_its_stacked_variant():
    st = variant_styles(["tucker", "lora", "tucker@layers", "cp@layers", "tucker@other"])
    assert st["tucker"]["color"] == st["tucker@layers"]["color"] == st["tucker@other"]["color"] != st["lora"]["color"]
    assert st["tucker"]["ls"] == "-" and st["tucker@layers"]["ls"] not in ("-", st["tucker@other"]["ls"])
    assert st["cp@layers"]["color"] not in (st["tucker"]["color"], st["lora"]["color"])
