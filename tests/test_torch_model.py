"""PyTorch binding at model level: config, inject, summary, adapters by name, merge, save/load, PEFT export."""

from __future__ import annotations

import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tucker_peft as tp  # noqa: E402
from tucker_peft.backends.torch import (AdapterConfig, AdaptedLayer, adapted_layers, adapter_names,  # noqa: E402
                                        active_adapter, delete_adapter, disable_adapters, export_peft_lora, inject, load_adapter,
                                        merge, merge_and_unload, save_adapter, set_adapter, summary,
                                        trainable_parameters, unmerge)
from tucker_peft.backends.torch._model import adapter_extras, extra_trainable  # noqa: E402

KINDS = ["tucker", "tucker2", "cp", "lora"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2)
        self.head = nn.Linear(12 * 4 + 6, 5)

    def forward(self, x, idx):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.dw(h))
        h = self.conv2(h).mean(dim=3).flatten(1)
        return self.head(torch.cat([h, self.emb(idx).mean(1)], 1))


TARGETS = ["conv1", "dw", "conv2", "head", "emb"]


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Net().to(dtype)


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 9, 9, generator=g, dtype=dtype), torch.randint(0, 10, (2, 3), generator=g)


def _perturb(model, seed=1, only=None):
    g = torch.Generator().manual_seed(seed)
    for _, h in adapted_layers(model):
        for n, d in h.adapters.items():
            if only is not None and n != only:
                continue
            for p in d.params.values():
                p.data.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- config -----------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(kind="nope"), "kind: expected one of"),
    (dict(ranks=0), "ranks: expected a positive int"),
    (dict(ranks=4, budget=100), "give one of them"),
    (dict(budget="lora:x"), "budget: expected"),
    (dict(alpha=float("nan")), "alpha: expected a finite"),
    (dict(init="svd"), "init: expected one of"),
    (dict(dropout=1.5), "dropout: expected a float"),
    (dict(forward="fast"), "forward: expected one of"),
    (dict(forward="rebuild", dropout=0.1), "cannot drop out"),
    (dict(target_modules=None), "target_modules: expected module names"),
    (dict(target_modules="conv[", ), "invalid regex"),
    (dict(rank_pattern={"conv1": -1}), r"rank_pattern\['conv1'\]"),
    (dict(strict=1), "strict: expected True or False, got 1"),
])
def test_config_errors_name_the_field(kw, match):
    args = dict(target_modules=["conv1"]) | kw
    with pytest.raises(tp.TuckerPeftError, match=match):
        AdapterConfig(**args)


def test_every_config_field_is_typed():
    import typing
    hints = typing.get_type_hints(AdapterConfig)
    assert set(hints) == {f.name for f in __import__("dataclasses").fields(AdapterConfig)}
    assert all(h is not typing.Any for h in hints.values())


def test_config_round_trips_through_dict():
    cfg = AdapterConfig(kind="tucker", ranks=(4, 2, None, None), target_modules="conv.*", rank_pattern={"conv2": 3},
                        alpha=2.0, trainable=["head.bias"])
    again = AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_int_ranks_clip_per_mode_and_depthwise_gets_true_shape():
    m = _net()
    inject(m, AdapterConfig(kind="tucker", ranks=8, target_modules=["dw", "conv1"]))
    specs = {h.layer_name: h.adapters["default"].spec for _, h in adapted_layers(m)}
    assert specs["dw"].shape == (8, 1, 3, 3) and specs["dw"].ranks == (8, 1, 3, 3)
    assert specs["conv1"].ranks == (8, 3, 3, 3)


def test_budget_matches_lora_and_rank_pattern_overrides():
    m = _net()
    inject(m, AdapterConfig(kind="tucker", budget="lora:2", target_modules=["conv1", "conv2", "head"],
                            rank_pattern={"head": 3}))
    for _, h in adapted_layers(m):
        spec = h.adapters["default"].spec
        if h.layer_name == "head":
            assert spec.ranks == (3, 3)
        else:
            assert spec == tp.ranks.match(tp.LoRA(spec.shape, 2), "tucker")
            assert spec.num_params <= tp.LoRA(spec.shape, 2).num_params


def test_bad_targets_and_ranks_leave_model_unchanged():
    m = _net()
    before = _state(m)
    with pytest.raises(tp.TuckerPeftError, match="matched nothing.*adaptable layers of this model: 'emb', 'conv1'"):
        inject(m, AdapterConfig(target_modules=["nonexistent"]))
    with pytest.raises(tp.RankError, match="layer 'conv1' with weight \\(8, 3, 3, 3\\)"):
        inject(m, AdapterConfig(kind="tucker", ranks=(4, 4, 9, 3), target_modules=["conv2", "conv1"]))
    # a kind that takes one int rank says so (its own RankError), before the model changes
    with pytest.raises(tp.RankError, match=r"layer 'conv1' with weight .*rank \(CP of shape .*expected an int.*got \(2, 2\)"):
        inject(m, AdapterConfig(kind="cp", ranks=(2, 2), target_modules=["conv1"]))
    with pytest.raises(tp.TuckerPeftError, match="adapter_name: .*no dots.*got 'a.b'"):
        inject(m, AdapterConfig(target_modules=["dw"]), adapter_name="a.b")
    assert not list(adapted_layers(m))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())


def test_inject_freezes_base_and_trains_extra_by_pattern():
    m = _net()
    inject(m, AdapterConfig(kind="cp", ranks=2, target_modules=TARGETS, trainable=["head.bias"]))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    copy_name = "head.base_layer.parametrizations.bias.0.modules_to_save.default"
    assert copy_name in names
    assert all(".adapters.default." in n for n in names - {copy_name})
    assert trainable_parameters(m) == sum(h.adapters["default"].spec.num_params for _, h in adapted_layers(m)) + 5


def test_summary_lists_each_layer():
    m = _net()
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=TARGETS))
    s = summary(m)
    assert [r["layer"] for r in s.rows] == ["emb", "conv1", "dw", "conv2", "head"]
    row = s.rows[1]
    assert row["shape"] == (8, 3, 3, 3) and row["ranks"] == "2,2,2,2"
    assert row["params"] == tp.Tucker((8, 3, 3, 3), 2).num_params
    assert abs(row["percent"] - 100 * row["params"] / (8 * 27)) < 1e-9
    text = str(s)
    assert "conv1" in text and "trainable:" in text


# -- training behaviour ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_training_step_changes_only_adapter(kind):
    m = _net(dtype=torch.float32)
    x, idx = _inputs(torch.float32)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    inject(m, AdapterConfig(kind=kind, ranks=2, target_modules=TARGETS, dropout=0.1, alpha=4.0))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = m(x, idx).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    sd = {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(base[k], sd[k]) for k in base)


# -- merging -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_and_unload(kind):
    m = _net()
    x, idx = _inputs()
    inject(m, AdapterConfig(kind=kind, ranks=3, target_modules=TARGETS))
    _perturb(m)
    w0 = {p: h.base_layer.weight.detach().clone() for p, h in adapted_layers(m)}
    y = m(x, idx)
    merge(m)
    torch.testing.assert_close(m(x, idx), y)
    assert all(not torch.equal(h.base_layer.weight, w0[p]) for p, h in adapted_layers(m))
    unmerge(m)
    for p, h in adapted_layers(m):
        torch.testing.assert_close(h.base_layer.weight, w0[p], rtol=0, atol=1e-14)
    plain = merge_and_unload(m)
    assert not any(isinstance(mod, AdaptedLayer) for mod in plain.modules())
    assert type(plain.conv1) is nn.Conv2d
    torch.testing.assert_close(plain(x, idx), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_accumulates_half_weights_in_fp32(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8)).to(dtype)
    inject(m, AdapterConfig(kind="tucker", ranks=4, target_modules=["0"], alpha=1e-3))
    _perturb(m)
    h = m[0]
    d = h.adapters["default"]
    assert next(iter(d.params.values())).dtype == torch.float32
    w = h.base_layer.weight.detach().clone()
    expect = (w.float() + d.delta_weight().detach()).to(dtype)
    merge(m)
    assert torch.equal(h.base_layer.weight, expect)
    unmerge(m)
    torch.testing.assert_close(h.base_layer.weight.float(), w.float(), rtol=0,
                               atol=2 * torch.finfo(dtype).eps * w.float().abs().max().item())
    x = torch.randn(3, 16).to(dtype)
    assert m(x).dtype == dtype


def test_merged_adapter_blocks_switching():
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"]), "a")
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"]), "b")
    merge(m)
    with pytest.raises(tp.TuckerPeftError, match="unmerge before switching"):
        set_adapter(m, "a")
    with pytest.raises(tp.TuckerPeftError, match="unmerge it before deleting"):
        delete_adapter(m, "b")


# -- several adapters ----------------------------------------------------------------

def test_several_named_adapters():
    m = _net()
    x, idx = _inputs()
    y0 = m(x, idx).detach()
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=["conv1", "conv2"]), "t")
    _perturb(m, 1)
    yt = m(x, idx).detach()
    inject(m, AdapterConfig(kind="cp", ranks=2, target_modules=["conv2", "head"]), "c")
    assert adapter_names(m) == ["t", "c"] and active_adapter(m) == "c"
    _perturb(m, 2, only="c")
    yc = m(x, idx).detach()
    assert not torch.allclose(yt, yc)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(".adapters.c." in n for n in trainable)
    set_adapter(m, "t")
    torch.testing.assert_close(m(x, idx), yt)
    with disable_adapters(m):
        torch.testing.assert_close(m(x, idx), y0)
    torch.testing.assert_close(m(x, idx), yt)
    set_adapter(m, None)
    torch.testing.assert_close(m(x, idx), y0)
    set_adapter(m, "c")
    torch.testing.assert_close(m(x, idx), yc)
    delete_adapter(m, "t")
    assert adapter_names(m) == ["c"]
    assert type(m.conv1) is nn.Conv2d  # no adapter left there: plain module again
    torch.testing.assert_close(m(x, idx), yc)
    with pytest.raises(tp.TuckerPeftError, match="expected one of \\['c'\\]"):
        set_adapter(m, "t")


def test_hosvd_adapter_cannot_share_a_weight():
    m = _net()
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=["conv1"], init="hosvd"), "h")
    with pytest.raises(tp.TuckerPeftError, match="cannot share the weight"):
        inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=["conv1"]), "z")
    w = m.conv1.base_layer.weight.detach().clone()
    delete_adapter(m, "h")
    ref = _net().conv1.weight
    torch.testing.assert_close(m.conv1.weight, ref)
    assert not torch.equal(w, ref)


# -- save / load ---------------------------------------------------------------------

@pytest.mark.parametrize("init", ["zero", "hosvd"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind, init):
    m = _net()
    x, idx = _inputs()
    inject(m, AdapterConfig(kind=kind, ranks=2, target_modules=TARGETS, init=init, trainable=["head.bias"]))
    _perturb(m)
    with torch.no_grad():
        adapter_extras(m, "default")["head.bias"].add_(1.0)
    y = m(x, idx).detach()
    save_adapter(m, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == ["tucker_peft_adapter.safetensors"]
    meta = tp._format.read_adapter(tmp_path / "ad").config
    assert meta["library_version"] == tp.__version__
    assert meta["layers"]["conv1.weight"]["base_shape"] == [8, 3, 3, 3]
    assert meta["layers"]["conv1.weight"]["spec"]["kind"] == kind
    fresh = _net()
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(x, idx), y)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in m.named_parameters() if p.requires_grad}


def test_load_into_a_different_model_fails_cleanly(tmp_path):
    m = _net()
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=TARGETS))
    save_adapter(m, tmp_path / "ad")

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2)

    other = Other().double()
    before = _state(other)
    with pytest.raises(tp.StateDictError, match=r"conv2.weight: adapter is for weight shape \(12, 8, 3, 3\), "
                                                r"the model's is \(16, 8, 3, 3\).*"):
        load_adapter(other, tmp_path / "ad")
    assert not list(adapted_layers(other))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    small = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(tp.StateDictError, match="no such weight in the model"):
        load_adapter(small, tmp_path / "ad")


def test_load_rejects_truncated_and_tampered_files(tmp_path):
    m = _net()
    inject(m, AdapterConfig(kind="cp", ranks=2, target_modules=TARGETS))
    save_adapter(m, tmp_path / "ad")
    f = tmp_path / "ad" / "tucker_peft_adapter.safetensors"
    data = f.read_bytes()
    fresh = _net()
    before = _state(fresh)
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(tp.StateDictError, match="corrupt or truncated"):
        load_adapter(fresh, tmp_path / "ad")
    from safetensors.torch import load, save
    meta = json.loads(tp._format.safetensors_metadata(data, "")["config"])
    meta["layers"]["conv1.weight"]["spec"]["rank"] = 3
    f.write_bytes(save(load(data), metadata={"format": tp._format.FORMAT, "config": json.dumps(meta)}))
    with pytest.raises(tp.StateDictError, match=r"conv1.weight::weights: expected shape \(3,\), got \(2,\)"):
        load_adapter(fresh, tmp_path / "ad")
    f.write_bytes(save(load(data), metadata={"format": tp._format.FORMAT, "config": "{not json"}))
    with pytest.raises(tp.StateDictError, match="not valid JSON"):
        load_adapter(fresh, tmp_path / "ad")
    with pytest.raises(tp.StateDictError, match="does not exist"):
        load_adapter(fresh, tmp_path / "missing")
    assert not list(adapted_layers(fresh))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=TARGETS))
    save_adapter(m, tmp_path / "ad")
    old = (tmp_path / "ad" / "tucker_peft_adapter.safetensors").read_bytes()
    _perturb(m)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(m, tmp_path / "ad")
    monkeypatch.undo()
    assert (tmp_path / "ad" / "tucker_peft_adapter.safetensors").read_bytes() == old
    assert sorted(os.listdir(tmp_path / "ad")) == ["tucker_peft_adapter.safetensors"]


def test_load_twice_under_same_name_is_refused(tmp_path):
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"]))
    save_adapter(m, tmp_path / "ad")
    with pytest.raises(tp.StateDictError, match="already exists"):
        load_adapter(m, tmp_path / "ad")
    load_adapter(m, tmp_path / "ad", adapter_name="again", is_trainable=False)
    assert adapter_names(m) == ["default", "again"] and active_adapter(m) == "again"
    assert trainable_parameters(m) == 0


# -- export to PEFT --------------------------------------------------------------------

def test_lora_factors_are_exact():
    from tucker_peft.backends.torch import lora_factors
    for kind in KINDS:
        for init in ("zero", "hosvd"):
            m = _net()
            inject(m, AdapterConfig(kind=kind, ranks=3, target_modules=TARGETS, init=init, alpha=1.7))
            _perturb(m)
            for _, h in adapted_layers(m):
                d = h.adapters["default"]
                b, a = lora_factors(d)
                dw = d.delta_weight() - (d.init_delta() if d.has_init else 0)
                torch.testing.assert_close(b @ a, dw.detach().reshape(dw.shape[0], -1))
                if kind in ("tucker", "tucker2") and init == "zero":
                    assert b.shape[1] == (d.spec.ranks[0] or d.spec.shape[0])
                if kind == "cp" and init == "zero":
                    assert b.shape[1] == d.spec.rank


@pytest.mark.parametrize("init", ["zero", "hosvd"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_peft_lora_loads_in_peft_with_same_outputs(tmp_path, kind, init):
    peft = pytest.importorskip("peft")
    m = _net()
    x, idx = _inputs()
    inject(m, AdapterConfig(kind=kind, ranks=3, target_modules=TARGETS, init=init, alpha=0.8))
    _perturb(m)
    y = m(x, idx).detach()
    export_peft_lora(m, tmp_path / "peft")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that grouped-conv LoRA cannot merge
        pm = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "peft"))
    torch.testing.assert_close(pm(x, idx), y)


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["0"]))
    with pytest.raises(tp.TuckerPeftError, match="ignores dilation"):
        export_peft_lora(m, tmp_path / "x")
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head.bias"]))
    with pytest.raises(tp.TuckerPeftError, match="head.bias"):
        export_peft_lora(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- the 'matched' scale rule ------------------------------------------------------------

@pytest.mark.parametrize("layer, x_shape", [(lambda: nn.Conv2d(64, 96, 3, padding=1), (8, 64, 8, 8)),
                                            (lambda: nn.Linear(200, 120), (64, 200))], ids=["conv", "linear"])
def test_matched_scale_makes_first_adam_step_like_loras(layer, x_shape):
    torch.manual_seed(0)
    base = nn.Sequential(layer())
    x = torch.randn(*x_shape)
    target = torch.randn_like(base(x))

    def first_step(kind, rule):
        m = inject(copy.deepcopy(base), AdapterConfig(kind=kind, budget="lora:8", target_modules=["0"], scale_rule=rule))
        (_, h), = list(adapted_layers(m))
        d = h.adapters["default"]
        w0 = d.delta_weight().detach().clone()
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        (m(x) - target).square().mean().backward()
        opt.step()
        return float((d.delta_weight().detach() - w0).norm())

    ref = first_step("lora", "fixed")
    for kind in ("tucker", "tucker2", "cp"):
        assert 1 / 1.5 < first_step(kind, "matched") / ref < 1.5, kind
    # Without the rule CP's first step is an order of magnitude smaller than LoRA's.
    assert first_step("cp", "fixed") < ref / 5


# -- trainable copies (PEFT's modules_to_save) ---------------------------------------------

def _adam_steps(m, x, idx, steps=2, lr=0.05):
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        m(x, idx).square().mean().backward()
        opt.step()


def test_each_adapter_trains_its_own_head_and_the_pretrained_one_comes_back():
    m, ref = _net(), _net()
    x, idx = _inputs()
    y0 = ref(x, idx).detach()
    head0 = {k: v.clone() for k, v in ref.head.state_dict().items()}
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head"]), "a")
    _adam_steps(m, x, idx)
    ya = m(x, idx).detach()
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=["conv2"], trainable=["head"]), "b")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "head" in n} == {"head.modules_to_save.b.weight", "head.modules_to_save.b.bias"}
    _adam_steps(m, x, idx)
    yb = m(x, idx).detach()
    # The pretrained head is bit-identical after training both adapters.
    assert all(torch.equal(m.head.original_module.state_dict()[k], v) for k, v in head0.items())
    assert not torch.equal(m.head.modules_to_save["a"].weight, m.head.modules_to_save["b"].weight)
    # Each adapter's output = the plain model with that adapter's ΔW and head (independent reference).
    for name, y in (("a", ya), ("b", yb)):
        plain = copy.deepcopy(ref)
        for _, h in adapted_layers(m):
            if name in h.adapters:
                getattr(plain, h.layer_name).weight.data += h.adapters[name].delta_weight().detach()
        plain.head.load_state_dict(m.head.modules_to_save[name].state_dict())
        torch.testing.assert_close(plain(x, idx), y)
    set_adapter(m, "a")
    assert torch.equal(m(x, idx), ya)
    set_adapter(m, None)
    assert torch.equal(m(x, idx), y0)
    set_adapter(m, "b")
    with disable_adapters(m):
        assert torch.equal(m(x, idx), y0)
    assert torch.equal(m(x, idx), yb)
    delete_adapter(m, "b")  # the active one: nothing active afterwards
    assert torch.equal(m(x, idx), y0) and list(m.head.modules_to_save) == ["a"]
    set_adapter(m, "a")
    assert torch.equal(m(x, idx), ya)
    delete_adapter(m, "a")
    assert type(m.head) is nn.Linear and type(m.conv1) is nn.Conv2d
    assert list(m.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())


def test_copy_state_dict_keys_leave_the_originals_where_a_plain_model_reads_them():
    m, ref = _net(), _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head", "emb"]), "a")
    _perturb(m)
    with torch.no_grad():
        m.head.modules_to_save["a"].weight.add_(1.0)
    sd = m.state_dict()
    assert [k for k in sd if k.startswith("head.")] == ["head.weight", "head.bias", "head.modules_to_save.a.weight",
                                                        "head.modules_to_save.a.bias"]
    assert torch.equal(sd["head.weight"], ref.head.weight) and torch.equal(sd["emb.weight"], ref.emb.weight)
    plain = Net().double()
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not [k for k in missing if k.startswith(("head", "emb"))]
    assert torch.equal(plain.head.weight, ref.head.weight)
    assert all(".modules_to_save." in k or ".base_layer." in k or ".adapters." in k for k in unexpected)
    again = copy.deepcopy(m)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    again.load_state_dict(sd)  # strict round trip through the renamed keys
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())


def test_parameter_entries_get_their_own_copies_also_on_adapted_layers():
    m, ref = _net(), _net()
    x, idx = _inputs()
    y0 = ref(x, idx).detach()
    # head is adapted; its bias, and conv2's (not adapted), are trained per adapter.
    inject(m, AdapterConfig(kind="cp", ranks=2, target_modules=["conv2", "head"], trainable=r"(head|conv2)\.bias"), "a")
    extras = adapter_extras(m, "a")
    assert sorted(extras) == ["conv2.bias", "head.bias"] and all(p.requires_grad for p in extras.values())
    assert {n for n, p in m.named_parameters() if p.requires_grad and ".adapters." not in n} == {
        "conv2.base_layer.parametrizations.bias.0.modules_to_save.a",
        "head.base_layer.parametrizations.bias.0.modules_to_save.a"}
    _adam_steps(m, x, idx)
    ya = m(x, idx).detach()
    assert not torch.equal(extras["head.bias"], ref.head.bias)
    assert all(torch.equal(p, getattr(ref, n.split(".")[0]).bias) for n, p in extra_trainable(m, ["head.bias", "conv2.bias"]).items())
    with disable_adapters(m):
        assert torch.equal(m(x, idx), y0)
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head.bias"]), "b")
    assert not extras["head.bias"].requires_grad and adapter_extras(m, "b")["head.bias"].requires_grad
    set_adapter(m, "a")
    assert torch.equal(m(x, idx), ya)
    plain = copy.deepcopy(ref)  # independent reference: ΔW and biases of adapter a put into a plain model
    for _, h in adapted_layers(m):
        if "a" in h.adapters:
            getattr(plain, h.layer_name).weight.data += h.adapters["a"].delta_weight().detach()
    plain.head.bias.data.copy_(extras["head.bias"])
    plain.conv2.bias.data.copy_(extras["conv2.bias"])
    torch.testing.assert_close(plain(x, idx), ya)
    delete_adapter(m, "a")
    delete_adapter(m, "b")
    assert list(m.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    assert all(type(a) is type(b) for a, b in zip(m.modules(), ref.modules()))


def test_parameter_copy_keys_and_unload():
    m, ref = _net(), _net()
    x, idx = _inputs()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head.bias"]))
    with torch.no_grad():
        adapter_extras(m, "default")["head.bias"].add_(1.0)
    sd = m.state_dict()
    assert [k for k in sd if k.startswith("head.")] == ["head.weight", "head.bias",
                                                        "head.parametrizations.bias.0.modules_to_save.default"]
    assert torch.equal(sd["head.bias"], ref.head.bias)
    again = copy.deepcopy(m)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    again.load_state_dict(sd)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())
    y = m(x, idx).detach()
    plain = merge_and_unload(m)
    assert type(plain.head) is nn.Linear and torch.equal(plain.head.bias, ref.head.bias + 1.0)
    torch.testing.assert_close(plain(x, idx), y)


def test_trainable_copies_save_and_load_per_adapter(tmp_path):
    m = _net()
    x, idx = _inputs()
    ys = {}
    for name, seed in (("a", 1), ("b", 2)):
        inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head"]), name)
        _perturb(m, seed, only=name)
        with torch.no_grad():
            m.head.modules_to_save[name].bias.add_(seed)
        ys[name] = m(x, idx).detach()
        save_adapter(m, tmp_path / name, adapter_name=name)
    fresh = _net()
    load_adapter(fresh, tmp_path / "a")
    load_adapter(fresh, tmp_path / "b", is_trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())  # the copy stays frozen as well
    torch.testing.assert_close(fresh(x, idx), ys["b"])
    set_adapter(fresh, "a")
    torch.testing.assert_close(fresh(x, idx), ys["a"])
    assert fresh.head.modules_to_save["a"].bias.requires_grad
    assert torch.equal(fresh.head.original_module.bias, _net().head.bias)


def test_merge_and_unload_keeps_the_active_copy():
    m = _net()
    x, idx = _inputs()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head"]), "a")
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head"]), "b")
    _perturb(m)
    with torch.no_grad():
        m.head.modules_to_save["a"].weight.mul_(2.0)
    set_adapter(m, "a")
    y = m(x, idx).detach()
    kept = m.head.modules_to_save["a"]
    plain = merge_and_unload(m)
    assert plain.head is kept and type(plain.head) is nn.Linear
    torch.testing.assert_close(plain(x, idx), y)


def test_trainable_that_matches_nothing_or_an_adapted_layer_is_refused():
    m = _net()
    before = _state(m)
    with pytest.raises(tp.TuckerPeftError, match=r"trainable: \['nope'\] matched no module or parameter"):
        inject(m, AdapterConfig(target_modules=["conv1"], trainable=["head", "nope"]))
    with pytest.raises(tp.TuckerPeftError, match="trainable: module 'conv1' holds or is inside the adapted layer 'conv1'"):
        inject(m, AdapterConfig(target_modules=["conv1"], trainable=["conv1"]))
    with pytest.raises(tp.TuckerPeftError, match="trainable: 'conv1.weight' is an adapted weight"):
        inject(m, AdapterConfig(target_modules=["conv1"], trainable=["conv1.weight"]))
    assert not list(adapted_layers(m)) and all(type(v) is not nn.Module for v in m.children())
    assert list(m.state_dict()) == list(before) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    inject(m, AdapterConfig(target_modules=["conv1"]), "a")
    with pytest.raises(tp.TuckerPeftError, match="adapted layer 'conv1'"):
        inject(m, AdapterConfig(target_modules=["conv2"], trainable=["conv1"]), "b")


def test_summary_shows_the_copies():
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head", "emb.weight"]), "a")
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head"]), "b")
    rows = [r for r in summary(m).rows if r["kind"] == "copy"]
    assert sorted((r["layer"], r["adapter"], r["active"], r["params"]) for r in rows) == [
        ("emb.weight", "a", False, 60), ("head", "a", False, 275), ("head", "b", True, 275)]
    assert "copy" in str(summary(m))


# -- budgets never exceed the layer -----------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_budget_is_capped_at_the_weights_size(kind):
    m = _net()
    inject(m, AdapterConfig(kind=kind, budget="lora:8", target_modules=["dw", "conv2"]))
    specs = {h.layer_name: h.adapters["default"].spec for _, h in adapted_layers(m)}
    # dw (8, 1, 3, 3): LoRA r=8 alone is 8·(8+9) = 136 > 72 parameters of the weight.
    assert specs["dw"].num_params <= 72
    assert specs["dw"] == tp.ranks.for_budget(kind, (8, 1, 3, 3), 72)
    ref = tp.LoRA((12, 8, 3, 3), 8)
    assert specs["conv2"] == tp.ranks.match(ref, kind) and specs["conv2"].num_params <= 12 * 72
    rows = {r["layer"]: r for r in summary(m).rows}
    assert rows["dw"]["clipped"] and not rows["conv2"]["clipped"] and rows["dw"]["percent"] <= 100
    lines = str(summary(m)).splitlines()
    assert lines[1].startswith("dw") and lines[1].endswith("clipped") and not lines[2].endswith("clipped")


@pytest.mark.parametrize("kind", KINDS)
def test_the_depthwise_kernel_of_the_report_gets_at_most_its_own_size(kind):
    shape = (16, 1, 3, 3)
    assert tp.ranks.match(tp.LoRA(shape, 8), "tucker").num_params > 144  # the case of the report: 134.7 %
    m = inject(nn.Sequential(nn.Conv2d(16, 16, 3, groups=16)), AdapterConfig(kind=kind, budget="lora:8",
                                                                             target_modules=["0"]))
    (row,) = summary(m).rows
    assert row["percent"] <= 100 and row["clipped"] and row["params"] == tp.ranks.for_budget(kind, shape, 144).num_params


def test_layer_smaller_than_any_adapter_is_skipped_once_or_refused_under_strict():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(300, 1), nn.Linear(8, 8), nn.Linear(200, 1))
    before = _state(m)
    with pytest.warns(UserWarning, match=r"skipped 2 layer\(s\).*'0' with weight \(1, 300\).*'2'") as rec:
        inject(m, AdapterConfig(kind="lora", budget="lora:4", target_modules=["0", "1", "2"]))
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    assert [h.layer_name for _, h in adapted_layers(m)] == ["1"]
    assert type(m[0]) is type(m[2]) is nn.Linear and torch.equal(m[0].weight, before["0.weight"])
    m2 = nn.Sequential(nn.Linear(300, 1), nn.Linear(8, 8))
    sd = _state(m2)
    with pytest.raises(tp.RankError, match=r"'0' with weight \(1, 300\) \(300 parameters\).*needs at least 301.*strict=True"):
        inject(m2, AdapterConfig(kind="lora", budget="lora:4", target_modules=["0", "1"], strict=True))
    assert not list(adapted_layers(m2)) and all(torch.equal(sd[k], v) for k, v in m2.state_dict().items())
    with pytest.raises(tp.RankError, match="every target is smaller"):
        inject(nn.Sequential(nn.Linear(300, 1)), AdapterConfig(kind="lora", budget="lora:4", target_modules=["0"]))


# -- target_modules='all-linear' --------------------------------------------------------------

def _peft_selection(model, **kw):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=2, **kw))
    return {n for n, mod in pm.base_model.model.named_modules() if isinstance(mod, LoraLayer)}


def _our_selection(model):
    m = inject(copy.deepcopy(model), AdapterConfig(kind="lora", ranks=2, target_modules="all-linear"))
    return {h.layer_name for _, h in adapted_layers(m)}


def _tiny(cls_name, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if cls_name.startswith("GPT2"):
        cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, **kw)
    else:
        cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16, **kw)
    return getattr(transformers, cls_name)(cfg)


@pytest.mark.parametrize("cls_name, peft_kw", [("BertForMaskedLM", {}), ("BertModel", {}),
                                               ("BertForSequenceClassification", {"task_type": "SEQ_CLS"}),
                                               ("GPT2LMHeadModel", {})])
def test_all_linear_selects_what_peft_selects(cls_name, peft_kw):
    from tucker_peft.backends.torch._layers import supported_types
    model = _tiny(cls_name)
    ours_types = {n for n, mod in model.named_modules() if isinstance(mod, supported_types())}
    theirs = _peft_selection(model, **peft_kw) & ours_types
    assert theirs  # GPT-2's attention and MLP are transformers Conv1D layers, adapted natively
    assert _our_selection(model) == theirs
    if cls_name != "BertModel":
        assert "cls.predictions.decoder" not in theirs and "classifier" not in theirs and "lm_head" not in theirs


def test_all_linear_on_a_plain_module_is_every_linear():
    assert _our_selection(_net()) == _peft_selection(_net()) == {"head"}
    with pytest.raises(tp.TuckerPeftError, match="matched nothing"):
        inject(nn.Sequential(nn.Conv2d(3, 3, 3)), AdapterConfig(target_modules="all-linear"))


# -- inject is all or nothing ---------------------------------------------------------------------

def _snapshot(m):
    sd = m.state_dict()
    return (list(sd), {k: v.detach().cpu().numpy().tobytes() for k, v in sd.items()},
            [(n, type(mod)) for n, mod in m.named_modules()], [(n, p.requires_grad) for n, p in m.named_parameters()],
            active_adapter(m), adapter_names(m))


@pytest.mark.parametrize("fault", ["last-delta", "copy", "set_adapter"])
@pytest.mark.parametrize("existing", [False, True])
def test_inject_failure_restores_the_model_exactly(monkeypatch, fault, existing):
    from torch.nn.utils import parametrize
    from tucker_peft.backends.torch import _model, _modules_to_save
    m = _net()
    x, idx = _inputs()
    if existing:
        inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1", "head"], trainable=["emb"]), "a")
        _perturb(m)
    if fault == "set_adapter":  # a real refusal late in inject: an 'hosvd' adapter cannot be switched off
        inject(m, AdapterConfig(kind="tucker", ranks=2, target_modules=["conv2"], init="hosvd"), "h")
    y = m(x, idx).detach()
    before = _snapshot(m)
    if fault == "last-delta":
        real = _model.DeltaWeight

        def faulty(spec, *a, **k):
            if tuple(spec.shape) == (12, 8, 3, 3):
                raise RuntimeError("injected fault")
            return real(spec, *a, **k)
        monkeypatch.setattr(_model, "DeltaWeight", faulty)
    elif fault == "copy":  # after the last copy (of a parameter) was made
        real_add = _modules_to_save._add_param_copy

        def late(*a, **k):
            real_add(*a, **k)
            raise RuntimeError("injected fault")
        monkeypatch.setattr(_modules_to_save, "_add_param_copy", late)
    cfg = AdapterConfig(kind="tucker", ranks=2, target_modules=["dw", "conv1"], init="zero" if existing else "hosvd",
                        target_parameters=[] if fault == "set_adapter" else ["conv2.weight"],
                        trainable=["emb", "head.bias"])
    if fault == "set_adapter":
        cfg = AdapterConfig(kind="lora", ranks=2, target_modules=["dw"])
    with pytest.raises((RuntimeError, tp.TuckerPeftError), match="injected fault|cannot be switched off"):
        inject(m, cfg, "new")
    after = _snapshot(m)
    assert after[0] == before[0]                      # same keys, same order
    assert after[1] == before[1]                      # byte-identical values
    assert after[2] == before[2] and after[3] == before[3] and after[4:] == before[4:]
    if not existing and fault != "set_adapter":
        assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
    assert torch.equal(m(x, idx), y)


def test_two_active_adapters_may_not_both_bring_a_copy_of_one_module():
    from tucker_peft.backends.torch import _modules_to_save
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head"]), "a")
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv2"], trainable=["head", "emb"]), "b")
    with pytest.raises(tp.TuckerPeftError, match=r"\['a', 'b'\] each have their own copy of 'head'"):
        _modules_to_save.set_active(m, ["a", "b"])
    assert m.head.active_adapter == "b" and m.emb.active_adapter == "b"


def test_load_writes_saved_copies_only_into_copies_never_into_base_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tucker_peft._format import ADAPTER_FILE
    m = _net()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["conv1"], trainable=["head.bias"]))
    save_adapter(m, tmp_path / "ad")
    f = tmp_path / "ad" / ADAPTER_FILE
    with safe_open(f, framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(f)
    tensors["base::conv2.weight"] = torch.zeros(12, 8, 3, 3, dtype=torch.float64)  # not marked trainable
    save_file(tensors, f, metadata=meta)
    fresh = _net()
    before = _state(fresh)
    with pytest.raises(tp.StateDictError):  # today it names conv2.weight; a content hash may refuse it first
        load_adapter(fresh, tmp_path / "ad")
    assert list(fresh.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
