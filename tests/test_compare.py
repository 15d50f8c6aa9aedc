"""``tucker_peft.compare``: a user's task through the Python API and the CLI, budgets below LoRA's minimum,
failed runs, interleaving, and the statistics against independent references."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tucker_peft import TuckerPeftError, cli  # noqa: E402
from tucker_peft.compare import Results, Task, parse_budget, run  # noqa: E402
from tucker_peft.compare import stats  # noqa: E402


class ConvTask(Task):
    """A user's task defined outside the package: two convs, a frozen teacher, MSE; adapts the 32x32 conv."""

    name = "user-conv"
    metric = "mse"
    higher_is_better = False
    target_modules = r"2"
    steps, batch_size, seeds, budgets, lrs = 3, 8, (0, 1), ("lora:1",), (1e-2,)
    train_size = 32

    def prepare(self):
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.x = torch.randn(64, 3, 6, 6, generator=g)
        with torch.no_grad():
            self.y = self.net(self.x) + 0.1 * torch.randn(64, 32, generator=g)

    def build_model(self, seed):
        import copy

        m = copy.deepcopy(self.net)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def batch(self, idx):
        return self.x[idx], self.y[idx]

    def loss(self, model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    def evaluate(self, model, split):
        sl = slice(32, 48) if split == "val" else slice(48, 64)
        with torch.no_grad():
            return float(self.loss(model, (self.x[sl], self.y[sl])))


def _kind(model):
    from tucker_peft.backends.torch import summary

    return summary(model).rows[0]["kind"]


def test_user_task_through_the_api_with_a_budget_below_lora_rank_1(tmp_path):
    res = run(ConvTask(), kinds=["tucker", "cp", "lora"], budgets=["lora:0.5", "lora:1"], seeds=2, lrs=[1e-2, 3e-2],
              out=str(tmp_path), quiet=True, threads=1)
    assert isinstance(res, Results)
    rows = {(s["budget"], s["kind"]) for s in res.summary}
    # LoRA rank 1 on the (32, 32, 3, 3) conv costs 32 + 288 = 320 parameters: half of it is below LoRA's reach
    assert rows == {("lora:0.5", "tucker"), ("lora:0.5", "cp"), ("lora:1", "tucker"), ("lora:1", "cp"),
                    ("lora:1", "lora")}
    assert any("lora" in n and "lora:0.5" in n for n in res.notes)
    for s in res.summary:
        limit = (0.5 if s["budget"] == "lora:0.5" else 1) * (32 + 32 * 9)
        assert 0 < s["adapter_params"] <= limit
        assert s["seeds"] == 2 and s["failed"] == 0
    low = [s for s in res.summary if s["budget"] == "lora:0.5"]
    assert all(s["vs_lora_mean"] is None and s["vs_lora_ci_low"] is None for s in low)
    paired = [s for s in res.summary if s["budget"] == "lora:1" and s["kind"] != "lora"]
    for s in paired:
        lo, hi = s["vs_lora_ci_low"], s["vs_lora_ci_high"]
        assert lo <= s["vs_lora_mean"] <= hi and s["vs_lora_ci_method"] == "t"
        assert s["vs_lora_ci_contains_0"] == (lo <= 0 <= hi)
        assert s["step_ratio_lora"] > 0
    text = res.table()
    assert "lora:0.5" in text and "no row" in text and "95% CI" in text
    # the files hold the same as the object
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res.summary))
    assert Results.from_json(str(tmp_path / "results.json")).table() == text
    for name in ("results.csv", "runs.csv", "results.md", "results.png", "budget_curve.png", "lr_sensitivity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "runs.csv", newline="", encoding="utf-8") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 * 2 * 2 * 2 + 2 * 2  # (tucker, cp) x 2 budgets x 2 lrs x 2 seeds + lora at lora:1
    assert all(r["status"] == "ok" or r["status"] == "stalled" for r in runs)
    if hasattr(__import__("os"), "getloadavg"):
        assert all(float(r["load_start"]) >= 0 and float(r["load_end"]) >= 0 for r in runs)


def test_runs_are_interleaved_across_kinds():
    res = run(ConvTask(), kinds=["tucker", "cp", "lora"], seeds=2, lrs=[1e-2, 3e-2], quiet=True, threads=1)
    rounds: dict[int, list[str]] = {}
    for r in res.runs:
        rounds.setdefault(r["round"], []).append(r["kind"])
    assert len(rounds) == 4  # 2 seeds x 2 grid positions
    for kinds in rounds.values():
        assert sorted(kinds) == ["cp", "lora", "tucker"]
    order = [r["kind"] for r in res.runs]
    assert order[:3] != ["tucker", "cp", "lora"] or order[3:6] != ["tucker", "cp", "lora"]  # shuffled per round
    # a run's numbers do not depend on its place in the order
    again = run(ConvTask(), kinds=["tucker", "cp", "lora"], seeds=2, lrs=[1e-2, 3e-2], quiet=True, threads=1,
                order_seed=5)
    key = lambda r: (r["budget"], r["kind"], r["lr"], r["seed"])  # noqa: E731
    assert {key(r): r["val"] for r in res.runs} == {key(r): r["val"] for r in again.runs}


class _Broken(ConvTask):
    """cp's loss raises on seed 1."""

    def build_model(self, seed):
        self._seed = seed
        return super().build_model(seed)

    def loss(self, model, batch):
        if self._seed == 1 and _kind(model) == "cp":
            raise RuntimeError("boom in the user's loss")
        return super().loss(model, batch)


def test_a_failing_task_gets_one_line_per_run_and_the_rest_is_written(tmp_path):
    lines: list[str] = []
    res = run(_Broken(), kinds=["cp", "lora"], seeds=2, lrs={"cp": [1e-2], "lora": [1e-2, 1e30]}, steps=4,
              out=str(tmp_path), quiet=True, threads=1, report=lines.append)
    statuses = {(r["kind"], r["lr"], r["seed"]): r["status"] for r in res.runs}
    assert statuses[("cp", 1e-2, 1)] == "error" and statuses[("cp", 1e-2, 0)] in ("ok", "stalled")
    assert statuses[("lora", 1e30, 0)] == "diverged" and statuses[("lora", 1e30, 1)] == "diverged"
    errors = [f for f in res.failures if "boom" in f]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("run cp budget lora:1 lr 0.01 seed 1:")
    assert sum("diverged" in f for f in res.failures) == 2
    assert lines == res.failures  # reported as they happened, one line each
    cp = next(s for s in res.summary if s["kind"] == "cp")
    assert cp["failed"] == 1 and cp["runs"] == 2
    lora = next(s for s in res.summary if s["kind"] == "lora")
    assert lora["diverged"] == 2 and lora["best_lr"] == 1e-2 and lora["seeds"] == 2
    assert res.timing["runs_diverged"] == 2 and res.timing["runs_failed"] == 3
    with open(tmp_path / "runs.csv", newline="", encoding="utf-8") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 + 4 and any(r["status"] == "error" and "boom" in r["error"] for r in runs)
    assert sum(r["status"] == "diverged" for r in runs) == 2
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()


def test_nan_metric_is_reported_and_disqualifies_the_lr():
    class NanTask(ConvTask):
        def evaluate(self, model, split):
            return float("nan") if _kind(model) == "tucker" else super().evaluate(model, split)

    lines: list[str] = []
    res = run(NanTask(), kinds=["tucker", "lora"], seeds=1, quiet=True, threads=1, report=lines.append)
    assert [r["status"] for r in res.runs if r["kind"] == "tucker"] == ["nan"]
    assert len(lines) == 1 and "tucker" in lines[0] and "nan" in lines[0].lower()
    tucker = next(s for s in res.summary if s["kind"] == "tucker")
    assert tucker["failed"] == 1 and tucker["test_per_seed"] == [None]


def test_a_malformed_task_stack_is_refused_clearly():
    class Stacked(ConvTask):
        stack = [["2"]]

    with pytest.raises(TuckerPeftError, match=r"stack: expected None, \{group: regex\}.*got \[\['2'\]\]"):
        run(Stacked(), quiet=True)


def test_user_task_through_the_cli(tmp_path, monkeypatch, capsys):
    mod = tmp_path / "my_user_task.py"
    mod.write_text(textwrap.dedent('''
        from tests.test_compare import ConvTask


        class MyTask(ConvTask):
            name = "from-a-file"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "res"
    code = cli.main(["compare", "--task", "my_user_task:MyTask", "--kinds", "tucker,lora", "--budgets",
                     "lora:0.25,lora:1", "--seeds", "2", "--lrs", "1e-2", "--steps", "2", "--threads", "1",
                     "--no-plot", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "from-a-file" and res["config"]["steps"] == 2 and res["config"]["threads"] == 1
    assert {(s["budget"], s["kind"]) for s in res["summary"]} == {("lora:0.25", "tucker"), ("lora:1", "tucker"),
                                                                 ("lora:1", "lora")}
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "no row" in printed
    # data options of the built-in tasks do not apply to a user's task
    assert cli.main(["compare", "--task", "my_user_task:MyTask", "--train-size", "8", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("argv", [
    ["--task", "no_such_module_xyz:Task"],
    ["--task", "tests.test_compare:NoSuchClass"],
    ["--threads", "100000"],
    ["--budgets", "lora:0"],
    ["--budgets", "lora:-0.5"],
    ["--detect", "nan"],
])
def test_bad_arguments_exit_2_with_one_line(argv, tmp_path, capsys):
    code = cli.main(["compare", *argv, "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tucker-peft: error: "), err


def test_parse_budget():
    assert parse_budget("lora:0.25") == "lora:0.25" and parse_budget("LoRA:4") == "lora:4"
    assert parse_budget("lora:2.0") == "lora:2" and parse_budget("1_000") == 1000 and parse_budget(7) == 7
    for bad in ("lora:0", "lora:", "0", -3, True, "lora:x", 2.5):
        with pytest.raises(TuckerPeftError):
            parse_budget(bad)


def test_fractional_lora_budget_in_adapter_config():
    from tucker_peft.backends.torch import AdapterConfig
    from tucker_peft._errors import RankError

    shape = (64, 32, 3, 3)
    for kind in ("tucker", "tucker2", "cp"):
        spec = AdapterConfig(kind=kind, budget="lora:0.5", target_modules="x").spec_for("x", shape)
        assert 0.5 * (64 + 288) * 0.5 < spec.num_params <= 0.5 * (64 + 288)
    with pytest.raises(RankError, match="lora"):
        AdapterConfig(kind="lora", budget="lora:0.5", target_modules="x").spec_for("x", shape)
    # an integer R is unchanged: LoRA rank R itself; R past full rank is clipped there, and then (issue 9 §7)
    # capped at the weight's own size: on (8, 4) rank 4 costs 48 > 32 parameters, rank 2 costs 24
    assert AdapterConfig(kind="lora", budget="lora:2", target_modules="x").spec_for("x", shape).rank == 2
    assert AdapterConfig(kind="lora", budget="lora:9.5", target_modules="x").spec_for("x", (8, 4)).rank == 2


def test_import_compare_pulls_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, tucker_peft; a = 'tucker_peft.compare' in sys.modules; "
                          "import tucker_peft.compare; print(a, 'torch' in sys.modules)"],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]


# -- statistics against independent references ------------------------------------------------------

def test_t_interval_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    d = [0.012, -0.004, 0.020, 0.007]
    lo, hi, method = stats.paired_ci(d)
    ref = scipy_stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert method == "t" and lo == pytest.approx(ref.low) and hi == pytest.approx(ref.high)
    assert stats.paired_ci([0.1]) is None


def test_bootstrap_interval_covers_the_mean_and_narrows_with_seeds():
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.01, size=12)
    lo, hi, method = stats.paired_ci(d)
    assert method == "bootstrap" and lo < d.mean() < hi
    # the percentile bootstrap is close to the normal interval mean ± 1.96 σ/√n for n = 12 (within 25%)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.25)


def test_seeds_needed_reaches_the_power_by_simulation():
    """At the returned n a simulated paired t test detects the difference >= 80% of the time; at n - 1 it does not."""
    scipy_stats = pytest.importorskip("scipy.stats")
    sd, delta = 0.012, 0.01
    n = stats.seeds_needed(sd, delta)
    assert 5 <= n <= 20
    rng = np.random.default_rng(0)

    def power(k: int) -> float:
        x = rng.normal(delta, sd, size=(20_000, k))
        t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(k))
        return float((np.abs(t) > scipy_stats.t.ppf(0.975, k - 1)).mean())

    assert power(n) >= 0.79 and power(n - 1) < 0.81
    assert stats.seeds_needed(0.0, 0.01) == 2 and stats.seeds_needed(float("nan"), 0.01) is None


def test_pareto_front_by_brute_force():
    rng = np.random.default_rng(3)
    pts = [(float(p), float(m)) for p, m in zip(rng.integers(1, 50, 30), rng.normal(size=30))]
    for higher in (True, False):
        front = set(stats.pareto_front(pts, higher))
        for i, (p, m) in enumerate(pts):
            beaten = any((q <= p and (v > m if higher else v < m)) or (q < p and v == m)
                         for j, (q, v) in enumerate(pts) if j != i)
            assert (i in front) == (not beaten)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_threads_follow_the_cpus_other_processes_keep_busy_now():
    from tucker_peft.compare.runner import busy_elsewhere, free_cores, machine_cores

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.2)
        busy = busy_elsewhere(0.3)
    finally:
        burner.kill()
        burner.wait()
    assert busy is not None and busy >= 0.5  # the spinning child, whatever else runs
    assert 1 <= free_cores() <= machine_cores()
