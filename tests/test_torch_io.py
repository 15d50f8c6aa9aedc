"""Adapter files under faults and hostile content: atomic saves (kill test), concurrent readers,
untrusted tensors/config, and total rollback of a failed load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save as st_save  # noqa: E402
from torch import nn  # noqa: E402

import tucker_peft as tp  # noqa: E402
from tucker_peft import _format  # noqa: E402
from tucker_peft.backends.torch import (AdapterConfig, adapted_layers, adapter_names, inject, load_adapter,  # noqa: E402
                                        save_adapter, set_adapter)
from tucker_peft.backends.torch import _layers  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 16, 5))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _perturb(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, h in adapted_layers(m):
            for d in h.adapters.values():
                for p in d.params.values():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))


def _snapshot(m: nn.Module) -> tuple[list[str], list[bytes], list[bool]]:
    sd = m.state_dict()
    return (list(sd), [v.detach().contiguous().view(torch.uint8).numpy().tobytes() for v in sd.values()],
            [p.requires_grad for p in m.parameters()])


def _saved(tmp_path, init="zero", trainable=None):
    m = _net()
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=["0", "2"], init=init, alpha=3.0,
                            trainable=trainable))
    _perturb(m)
    save_adapter(m, tmp_path / "src")
    f = _format.read_adapter(tmp_path / "src")
    return m, f.config, f.tensors()


def _write(d, tensors, config, raw_config=None) -> str:
    os.makedirs(d, exist_ok=True)
    text = raw_config if raw_config is not None else json.dumps(config)
    with open(os.path.join(d, _format.ADAPTER_FILE), "wb") as fh:
        fh.write(st_save(tensors, metadata={"format": _format.FORMAT, "config": text}))
    return str(d)


# -- the format ----------------------------------------------------------------------------

def test_one_file_with_config_and_no_peft_names(tmp_path):
    m, cfg, tensors = _saved(tmp_path, trainable=["5.bias"])
    assert os.listdir(tmp_path / "src") == [_format.ADAPTER_FILE]
    assert cfg["layers"]["0.weight"]["scale"] == m[0].adapters["default"].scale and cfg["trainable"] == ["5.bias"]
    assert set(tensors) == {f"{p}::{k}" for p in ("0.weight", "2.weight") for k in ("core", "factor_0", "factor_1",
                                                                                     "factor_2", "factor_3")} | {"base::5.bias"}
    fresh = _net()
    load_adapter(fresh, tmp_path / "src")
    torch.testing.assert_close(fresh(_x()), m(_x()), rtol=0, atol=0)


def test_legacy_pair_still_loads_and_save_replaces_it(tmp_path):
    m, cfg, tensors = _saved(tmp_path)
    d = tmp_path / "legacy"
    os.makedirs(d)
    (d / "adapter_config.json").write_text(json.dumps({"format": _format.LEGACY_FORMAT, **cfg}))
    (d / "adapter_model.safetensors").write_bytes(st_save(tensors, metadata={"format": _format.LEGACY_FORMAT}))
    fresh = _net()
    load_adapter(fresh, d)
    torch.testing.assert_close(fresh(_x()), m(_x()), rtol=0, atol=0)
    (d / "notes.txt").write_text("mine")
    save_adapter(fresh, d)
    assert sorted(os.listdir(d)) == ["notes.txt", _format.ADAPTER_FILE]
    # A PEFT adapter's adapter_config.json is not ours and is never removed.
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_adapter(fresh, d)
    assert "adapter_config.json" in os.listdir(d)


def test_float16_file_into_float32_model_is_cast_with_a_warning(tmp_path):
    m, cfg, tensors = _saved(tmp_path)
    d = _write(tmp_path / "h", {k: v.half() for k, v in tensors.items()}, cfg)
    fresh = _net()
    with pytest.warns(UserWarning, match="float16 were cast to float32"):
        load_adapter(fresh, d)
    for _, h in adapted_layers(fresh):
        assert all(p.dtype == torch.float32 for p in h.adapters["default"].params.values())
    ref = {k: v.half().float() for k, v in tensors.items()}
    for path, h in adapted_layers(fresh):
        for k, p in h.adapters["default"].params.items():
            assert torch.equal(p, ref[f"{path}::{k}"])


def test_nonfinite_loads_only_when_allowed_with_a_warning(tmp_path):
    _, cfg, tensors = _saved(tmp_path)
    tensors["0.weight::core"][0, 0, 0, 0] = float("nan")
    d = _write(tmp_path / "n", tensors, cfg)
    with pytest.raises(tp.StateDictError, match=r"0.weight::core: contains NaN or Inf"):
        load_adapter(_net(), d)
    fresh = _net()
    with pytest.warns(UserWarning, match="NaN/Inf"):
        load_adapter(fresh, d, allow_nonfinite=True)
    assert torch.isnan(fresh[0].adapters["default"].params["core"]).any()


# -- every failure leaves the model byte-identical ------------------------------------------

def _case(name, tmp_path, cfg, tensors):
    """A hostile variant of a valid adapter: (directory or path argument, error pattern)."""
    t = {k: v.clone() for k, v in tensors.items()}
    c = json.loads(json.dumps(cfg))
    d = tmp_path / name
    if name == "base_frozen":       # a base tensor for a parameter the config does not mark trainable
        t["base::2.weight"] = torch.zeros(6, 6, 3, 3)
        return _write(d, t, c), "base::2.weight: refused"
    if name == "base_listed_not_trainable":  # listed in the file, but not by the config's trainable patterns
        t["base::0.bias"] = torch.zeros(6)
        c["trainable"] = ["0.bias"]
        return _write(d, t, c), "base::0.bias: refused"
    if name == "base_dtype":
        t["base::5.bias"] = t["base::5.bias"].double()
        return _write(d, t, c), "base::5.bias: expected dtype float32, got float64"
    if name == "base_shape":
        t["base::5.bias"] = torch.zeros(7)
        return _write(d, t, c), r"base::5.bias: expected shape \(5,\), got \(7,\)"
    if name == "base_nan":
        t["base::5.bias"][0] = float("nan")
        return _write(d, t, c), "base::5.bias: contains NaN"
    if name == "weight_inf":
        t["2.weight::factor_1"][0, 0] = float("inf")
        return _write(d, t, c), "2.weight::factor_1: contains NaN or Inf"
    if name.startswith("scale_"):
        c["layers"]["2.weight"]["scale"] = {"scale_nan": float("nan"), "scale_inf": float("inf"), "scale_zero": 0.0,
                                            "scale_bool": True, "scale_str": "5.0"}[name]
        raw = json.dumps(c)  # NaN/Inf as JSON's non-standard tokens, which json.loads accepts
        return _write(d, t, c, raw), "scale: expected a finite non-?zero number"
    if name in ("int64", "bool", "complex"):
        dt = {"int64": torch.int64, "bool": torch.bool, "complex": torch.complex64}[name]
        t["2.weight::core"] = t["2.weight::core"].to(dt)
        return _write(d, t, c), f"2.weight::core: expected a floating-point tensor, got {str(dt)[6:]}"
    if name == "legacy_base_frozen":  # the version-1 pair gets the same checks
        t["base::2.weight"] = torch.zeros(6, 6, 3, 3)
        os.makedirs(d)
        (d / "adapter_config.json").write_text(json.dumps({"format": _format.LEGACY_FORMAT, **c}))
        (d / "adapter_model.safetensors").write_bytes(st_save(t, metadata={"format": _format.LEGACY_FORMAT}))
        return str(d), "base::2.weight: refused"
    if name == "empty_layers":
        c["layers"] = {}
        return _write(d, {"base::5.bias": t["base::5.bias"]}, c), "adapts no layer"
    if name == "unexpected":
        t["0.weight::extra"] = torch.zeros(2)
        return _write(d, t, c), "unexpected tensors"
    if name.startswith("config_"):
        raw = {"config_list": "[1, 2]", "config_str": '"x"', "config_int": "3", "config_deep": "[" * 100_000 + "]" * 100_000,
               "config_inner_list": json.dumps({**c, "config": [1]}), "config_layers_str": json.dumps({**c, "layers": "x"}),
               "config_spec_deep": json.dumps(c).replace('"spec": {', '"spec": {"x": ' + "[" * 50_000 + "]" * 50_000 + ', ', 1)
               }[name]
        return _write(d, t, c, raw), "adapter config|spec|not valid JSON|bad layer entry"
    if name == "truncated":
        p = _write(d, t, c)
        f = os.path.join(p, _format.ADAPTER_FILE)
        data = open(f, "rb").read()
        open(f, "wb").write(data[:-10])
        return p, "corrupt or truncated"
    if name.startswith("path_"):
        return {"path_none": None, "path_int": 3, "path_bytes": b"/tmp"}[name], "path: expected a directory path"
    if name == "fault_after_validation":  # a failure inside apply_plan, after other layers were changed
        return _write(d, t, c), "injected fault"
    raise AssertionError(name)


CASES = ["base_frozen", "base_listed_not_trainable", "base_dtype", "base_shape", "base_nan", "weight_inf",
         "scale_nan", "scale_inf", "scale_zero", "scale_bool", "scale_str", "int64", "bool", "complex", "unexpected", "empty_layers", "legacy_base_frozen",
         "config_list", "config_str", "config_int", "config_deep", "config_inner_list", "config_layers_str",
         "config_spec_deep", "truncated", "path_none", "path_int", "path_bytes", "fault_after_validation"]


@pytest.mark.parametrize("init", ["zero", "hosvd"])
def test_every_failed_load_leaves_the_model_byte_identical(tmp_path, monkeypatch, init):
    _, cfg, tensors = _saved(tmp_path, init=init, trainable=["5.bias"])
    real_init = _layers.DeltaWeight.__init__
    for name in CASES:
        model = _net()
        # Another adapter already on the model: its values, trainability and active state must survive too.
        inject(model, AdapterConfig(kind="lora", ranks=2, target_modules=["5"]), "keep")
        _perturb(model)
        set_adapter(model, "keep")
        before = _snapshot(model)
        y = model(_x())
        arg, pattern = _case(name, tmp_path, cfg, tensors)
        if name == "fault_after_validation":
            calls = []

            def faulty(self, *a, **k):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("injected fault")
                real_init(self, *a, **k)

            monkeypatch.setattr(_layers.DeltaWeight, "__init__", faulty)
        with pytest.raises((tp.TuckerPeftError, RuntimeError), match=pattern):
            load_adapter(model, arg)
        monkeypatch.undo()
        assert _snapshot(model) == before, name
        assert adapter_names(model) == ["keep"], name
        torch.testing.assert_close(model(_x()), y, rtol=0, atol=0)


# -- a killed save: the directory holds the old adapter or the new one ----------------------

_CHILD = textwrap.dedent('''
    import os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from tucker_peft.backends.torch import AdapterConfig, adapted_layers, inject, save_adapter

    def make(value, alpha):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        inject(m, AdapterConfig(kind="lora", ranks=64, alpha=alpha, target_modules=["0", "2"]))
        for _, h in adapted_layers(m):
            for p in h.adapters["default"].params.values():
                p.data.fill_(value)
        return m

    mode, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    A, B = make(1.0, 2.0), make(3.0, 5.0)
    save_adapter(A, os.path.join(d, "refA"))
    save_adapter(B, os.path.join(d, "refB"))
    target = os.path.join(d, "ad")
    save_adapter(A, target)
    print("ready", flush=True)
    if mode == "kill":
        rng = random.Random(n)
        t0 = time.perf_counter()
        for _ in range(3):
            save_adapter(A, os.path.join(d, "scratch"))
        t_save = (time.perf_counter() - t0) / 3  # kills land within the first few saves, however slow the machine
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the saver: B over A, A over B, ... until killed
                os.write(w, b"x")
                k = 0
                while True:
                    save_adapter(B if k % 2 == 0 else A, target)
                    k += 1
            os.read(r, 1)
            os.close(r)
            os.close(w)
            time.sleep(rng.uniform(0.0, 3 * t_save))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print("killed", flush=True)
            sys.stdin.readline()  # the test has checked the directory
    else:
        k = 0
        while not os.path.exists(os.path.join(d, "stop")):
            save_adapter(B if k % 2 == 0 else A, target)
            k += 1
        print(k, flush=True)
''')


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{p}::{k}": v.detach().clone() for p, h in adapted_layers(m) for k, v in h.adapters["default"].params.items()} \
        | {f"{p}::scale": torch.tensor(h.adapters["default"].scale) for p, h in adapted_layers(m)}


def _which(d, refs) -> str:
    got = _params(load_adapter(_tiny(), d))
    for name, ref in refs.items():
        if got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref):
            return name
    return "neither"


def _start(mode, tmp_path, n):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(tmp_path), str(n)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert child.stdout.readline().strip() == "ready"
    refs = {"A": _params(load_adapter(_tiny(), tmp_path / "refA")), "B": _params(load_adapter(_tiny(), tmp_path / "refB"))}
    return child, refs


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_saves_leave_the_old_or_the_new_adapter(tmp_path):
    n = 60
    child, refs = _start("kill", tmp_path, n)
    seen = {"A": 0, "B": 0, "neither": 0}
    temps = 0
    try:
        for _ in range(n):
            assert child.stdout.readline().strip() == "killed"
            temps += any(f.startswith(_format.TEMP_PREFIX) for f in os.listdir(tmp_path / "ad"))
            seen[_which(tmp_path / "ad", refs)] += 1
            child.stdin.write("\n")
            child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
    print(f"kill test: {n} kills -> {seen}, {temps} left a temporary file")
    assert seen["neither"] == 0 and seen["A"] + seen["B"] == n
    assert seen["A"] and seen["B"] and temps  # kills landed mid-write, in both directions of the overwrite
    save_adapter(load_adapter(_tiny(), tmp_path / "ad"), tmp_path / "ad")  # the next save cleans up
    assert os.listdir(tmp_path / "ad") == [_format.ADAPTER_FILE]


def test_loads_during_concurrent_saves_are_always_one_whole_adapter(tmp_path):
    child, refs = _start("write", tmp_path, 0)
    seen = {"A": 0, "B": 0, "neither": 0}
    try:
        for _ in range(150):
            seen[_which(tmp_path / "ad", refs)] += 1
    finally:
        (tmp_path / "stop").write_text("")
        saves = int(child.stdout.readline())
        child.wait(timeout=30)
    print(f"concurrent reads: {sum(seen.values())} loads during {saves} saves -> {seen}")
    assert seen["neither"] == 0
    assert seen["A"] and seen["B"] and saves >= 2


def test_extract_output_loads_with_load_adapter(tmp_path, capsys):
    """`tucker-peft extract` writes the same format: base + extracted adapter reproduces the tuned model."""
    from safetensors.torch import save_file

    from tucker_peft.cli import main

    base = _net()
    tuned = _net()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # rank-1 changes along the output mode: exact for LoRA at rank 1
        for name in ("0.weight", "2.weight"):
            w = dict(tuned.named_parameters())[name]
            u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w[0].numel(), generator=g)
            w.add_((u @ v).reshape(w.shape))
    save_file(dict(base.state_dict()), str(tmp_path / "base.safetensors"))
    save_file(dict(tuned.state_dict()), str(tmp_path / "tuned.safetensors"))
    rc = main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--kind", "lora",
               "--match", "lora:1", "--include", r".*\.weight", "-o", str(tmp_path / "ad"), "-q"])
    assert rc == 0, capsys.readouterr().err
    load_adapter(base, tmp_path / "ad")
    assert {p for p, _ in adapted_layers(base)} == {"0.weight", "2.weight"}
    torch.testing.assert_close(base(_x()), tuned(_x()), rtol=1e-5, atol=1e-5)
