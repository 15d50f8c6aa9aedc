"""Cross-layer adapters (AdapterConfig.stack, issue 12) in the PyTorch binding.

References are independent of the binding: the stacked ΔW is built with the core's ``spec.reconstruct`` (torch
autograd) and put into a plain copy of the model through ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import math
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from tucker_peft._errors import RankError, TuckerPeftError  # noqa: E402
from tucker_peft.backends.torch import (AdapterConfig, adapted_layers, delete_adapter, disable_adapters,  # noqa: E402
                                        export_peft_lora, inject, load_adapter, merge, merge_and_unload,
                                        save_adapter, set_adapter, summary, unmerge)
from tucker_peft.backends.torch._stack import StackedDelta, StackMember, stacks  # noqa: E402
from tucker_peft.lora import LoRA  # noqa: E402

KINDS = ["tucker", "tucker2", "cp", "lora", "tt", "lokr", "loha"]
QKV = {"qkv": r"layers\.(?P<layer>\d+)\.(?P<role>[qkv])"}
TARGETS = r"layers\.\d+\.[qkv]"


class Block(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


class Net(nn.Module):
    def __init__(self, n: int = 3, d: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = torch.tanh(c(x))
        return x


def _net(n: int = 3) -> Net:
    torch.manual_seed(0)
    return Net(n).double()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (4, 6)), generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _group(model: nn.Module, adapter: str = "default", group: str = "qkv") -> StackedDelta:
    return next(sd for _, g, a, sd in stacks(model) if (g, a) == (group, adapter))


def _randomise(model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, sd in stacks(model):
            for p in sd.params.values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _reference(base: nn.Module, sd: StackedDelta, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The plain model with ``W_m + s·ΔW[index_m]``, ΔW the core's reconstruction of the whole stack."""
    dw = sd.spec.reconstruct(params, sd.scale)
    weights = {p: base.get_parameter(p) + dw[i] for p, i in sd.members.items()}
    return functional_call(base, weights, (x,))


def _cfg(**kw) -> AdapterConfig:
    return AdapterConfig(**{"kind": "tucker", "ranks": 2, "target_modules": TARGETS, "stack": QKV, **kw})


# -- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stack, msg", [
    ({"qkv": r"layers\.(\d+)"}, "named capture group"),
    ({"q kv": r"(?P<l>\d+)"}, "identifiers"),
    ({"qkv": r"(?P<l>\d+"}, "invalid regex"),
    ({"qkv": 3}, "regex string"),
    ({}, "non-empty dict"),
    ("layers", "non-empty dict"),
])
def test_config_refuses_bad_stacks(stack, msg):
    with pytest.raises(TuckerPeftError, match=msg):
        _cfg(stack=stack)


def test_config_round_trips_the_stack():
    cfg = _cfg(rank_pattern={"qkv": (2, 3, 2, 2)})
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["stack"] == QKV


# -- the forward -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_member_slice_equals_the_slice_of_the_stacked_reconstruction(kind):
    model = inject(_net(), _cfg(kind=kind))
    _randomise(model)
    sd = _group(model)
    assert sd.spec.shape == (3, 3, 6, 6) and len(sd.members) == 9
    full = sd.spec.reconstruct(sd.param_dict(), sd.scale)
    seen = 0
    for path, h in adapted_layers(model):
        d = h.adapters["default"]
        assert isinstance(d, StackMember) and d.index == sd.members[path]
        torch.testing.assert_close(d.delta_weight(), full[d.index], rtol=1e-12, atol=1e-12)
        seen += 1
    assert seen == 9
    assert sd.members["layers.2.k.weight"] == (2, 1)  # layer 2, role k (order of first appearance: q, k, v)


def test_digit_values_are_ordered_numerically_and_unmatched_targets_stay_per_layer():
    model = inject(_net(11), _cfg(target_modules=r"layers\.\d+\.[qkvo]"))
    sd = _group(model)
    assert sd.members["layers.10.q.weight"] == (10, 0) and sd.members["layers.9.v.weight"] == (9, 2)
    o = dict(adapted_layers(model))["layers.3.o.weight"].adapters["default"]
    assert not isinstance(o, StackMember) and o.spec.shape == (6, 6) and len(o.params) > 0


@pytest.mark.parametrize("kind, forward", [("tucker", "auto"), ("tucker", "factorized"), ("tucker", "rebuild"),
                                           ("cp", "auto"), ("lora", "auto"), ("tt", "auto")])
def test_linear_members_match_a_dense_reference(kind, forward):
    base = _net()
    model = inject(copy.deepcopy(base), _cfg(kind=kind, forward=forward))
    _randomise(model)
    sd = _group(model)
    x = _x().requires_grad_()
    y = model(x)
    cot = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * cot).sum().backward()
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in sd.param_dict().items()}
    xr = x.detach().clone().requires_grad_()
    yr = _reference(base, sd, ref_params, xr)
    (yr * cot).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for k, p in sd.params.items():
        torch.testing.assert_close(p.grad, ref_params[k].grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["tucker", "cp"])
def test_conv_members_match_a_dense_reference(kind):
    torch.manual_seed(0)
    base = ConvNet().double()
    cfg = AdapterConfig(kind=kind, ranks=2, target_modules=r"convs\.\d+", stack={"convs": r"convs\.(?P<i>\d+)"})
    model = inject(copy.deepcopy(base), cfg)
    _randomise(model, std=0.2)
    sd = _group(model, group="convs")
    assert sd.spec.shape == (3, 4, 4, 3, 3)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in sd.param_dict().items()}
    xr = x.detach().clone().requires_grad_()
    yr = _reference(base, sd, ref_params, xr)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for k, p in sd.params.items():
        torch.testing.assert_close(p.grad, ref_params[k].grad, rtol=1e-9, atol=1e-12)


def test_parameter_targets_stack_by_their_path(tmp_path):
    base = _net()
    cfg = AdapterConfig(kind="cp", ranks=3, target_parameters=r"layers\.\d+\.o\.weight",
                        stack={"o": r"layers\.(?P<layer>\d+)\.o\.weight"})
    model = inject(copy.deepcopy(base), cfg)
    _randomise(model)
    sd = _group(model, group="o")
    assert sd.spec.shape == (3, 6, 6) and set(sd.members) == {f"layers.{i}.o.weight" for i in range(3)}
    x = _x()
    torch.testing.assert_close(model(x), _reference(base, sd, sd.param_dict(), x), rtol=1e-10, atol=1e-12)
    save_adapter(model, tmp_path)
    torch.testing.assert_close(load_adapter(_net(), tmp_path)(x), model(x), rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_members():
    model = inject(_net(2), _cfg(ranks=2))
    _randomise(model)
    sd = _group(model)
    names = list(sd.params)
    x = _x(3, 6)

    prefix = "adapter_stacks.qkv.default.params."  # the ModuleList is skipped: the root owns the group
    assert prefix + "core" in dict(model.named_parameters())

    def g(*values):
        return functional_call(model, {prefix + k: v for k, v in zip(names, values)}, (x,))

    inputs = tuple(v.detach().clone().requires_grad_() for v in sd.params.values())
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_leaves_outputs_unchanged(kind):
    base = _net()
    x = _x()
    model = inject(copy.deepcopy(base), _cfg(kind=kind))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tucker", "cp", "lora"])
def test_hosvd_starts_from_the_stacked_weights_and_keeps_the_residual(kind):
    base = _net()
    x = _x()
    model = inject(copy.deepcopy(base), _cfg(kind=kind, init="hosvd"))
    torch.testing.assert_close(model(x), base(x), rtol=1e-10, atol=1e-10)
    sd = _group(model)
    dw0 = sd.spec.reconstruct(sd.init_params(), sd.scale)
    for p, i in sd.members.items():  # each base weight is W_m − s·ΔW₀[m]
        h = dict(adapted_layers(model))[p]
        torch.testing.assert_close(h.base_layer.weight, base.get_parameter(p) - dw0[i], rtol=1e-12, atol=1e-12)
    delete_adapter(model, "default")
    for p in sd.members:
        torch.testing.assert_close(model.get_parameter(p), base.get_parameter(p), rtol=1e-12, atol=1e-12)


# -- the group's spec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tucker", "cp", "tt", "lora"])
@pytest.mark.parametrize("r", ["lora:2", "lora:1", "lora:0.25"])
def test_budgets_are_the_members_lora_count_and_never_exceeded(kind, r):
    if kind == "lora" and r != "lora:2":  # LoRA on the flattened stack (3, 108) needs 111 > 9·12 parameters
        with pytest.raises(RankError, match="needs at least 111 parameters"):
            inject(_net(), _cfg(kind=kind, ranks=None, budget=r))
        return
    model = inject(_net(), _cfg(kind=kind, ranks=None, budget=r))
    sd = _group(model)
    rr = float(r[5:])
    per = LoRA((6, 6), int(rr)).num_params if rr >= 1 else math.floor(rr * 12)
    assert 0 < sd.spec.num_params <= 9 * per
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sd.spec.num_params


def test_kind_options_apply_to_the_stacked_shape_and_matched_scale_takes_the_lead():
    sd = _group(inject(_net(), _cfg(ranks=None, budget="lora:1", kind_options={"fixed": {0: 1}})))
    assert sd.spec.ranks[0] == 1 and sd.spec.num_params <= 9 * 12
    sd = _group(inject(_net(), _cfg(alpha=2.0)))
    assert sd.scale == pytest.approx(2.0 * sd.spec.matched_scale(lead=2)) and sd.scale != 2.0 * sd.spec.matched_scale()


def test_int_ranks_clip_per_mode_tuples_give_every_mode_and_patterns_name_the_group():
    assert _group(inject(_net(), _cfg(ranks=5))).spec.ranks == (3, 3, 5, 5)
    assert _group(inject(_net(), _cfg(ranks=(2, 3, 4, 1)))).spec.ranks == (2, 3, 4, 1)
    model = inject(_net(), _cfg(ranks=2, rank_pattern={"qkv": (1, 2, 3, 3)}, alpha_pattern={"qkv": 4.0},
                                scale_rule="fixed"))
    sd = _group(model)
    assert sd.spec.ranks == (1, 2, 3, 3) and sd.scale == 4.0
    with pytest.raises(TuckerPeftError, match="member of stack group 'qkv'"):
        inject(_net(), _cfg(rank_pattern={r"layers\.0\.q": 3}))


# -- grid errors -------------------------------------------------------------------------------------------

class Odd(Net):
    def __init__(self) -> None:
        super().__init__(2)
        self.layers[1].k = nn.Linear(6, 5)  # a member of another shape


def _mixed() -> Net:
    model = _net(2)
    model.layers[1].k.float()  # a member of another dtype
    return model


@pytest.mark.parametrize("make, cfg, msg", [
    (_net, dict(target_modules=r"layers\.\d+\.[qkv]|layers\.0\.o", stack={"qkvo": r"layers\.(?P<l>\d+)\.(?P<r>[qkvo])"}),
     r"do not fill the grid l=3 × r=4: 2 missing \(l=1, r=o; l=2, r=o\)"),
    (lambda: Odd().double(), {}, "differ in weight shape"),
    (_mixed, {}, "differ in dtype or device"),
    (_net, dict(stack={"a": r"layers\.(?P<l>\d+)\.[qk]", "b": r"layers\.0\.(?P<r>[qkv])"}), "matches groups"),
    (_net, dict(stack={"a": r"block\.(?P<l>\d+)"}), "matches none of the targets"),
    (_net, dict(stack={"a": r"layers\.(?P<l>\d+)\.\w"}), "both have l=0"),
])
def test_grid_errors_leave_the_model_unchanged(make, cfg, msg):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TuckerPeftError, match=msg):
        inject(model, _cfg(**cfg))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(adapted_layers(model)) and not list(stacks(model))


# -- everything else on a group ----------------------------------------------------------------------------

def test_group_params_live_once_on_the_common_ancestor():
    model = inject(_net(), _cfg())
    keys = [k for k in model.state_dict() if "adapter" in k]
    assert keys and all(k.startswith("adapter_stacks.qkv.default.params.") for k in keys)  # ModuleList skipped
    assert len(list(model.layers)) == 3  # the ModuleList still iterates over its blocks only
    text = str(summary(model))
    assert text.count("qkv (stack of 9)") == 2 and "stack layer=3×role=3" in text and "(3, 3, 6, 6)" in text


@pytest.mark.parametrize("init", ["zero", "hosvd"])
def test_a_root_sequential_never_calls_the_group(init, tmp_path):
    """The members' common ancestor is a plain nn.Sequential model: it would call a child ModuleDict in its
    forward, so the group sits on the first member's layer; train, state_dict, save/load, delete all hold."""
    def make() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()

    cfg = AdapterConfig(kind="tucker", ranks=2, target_modules=r"(0|2)", stack={"g": r"(?P<layer>0|2)"}, init=init)
    x = _x()
    ref = make()(x)
    model = inject(make(), cfg)
    assert len(model) == 5 and not any("adapter_stacks" in n for n, _ in model.named_children())
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-12)
    _randomise(model)
    y = model(x)
    assert not torch.allclose(y, ref)
    other = inject(make(), cfg)
    other.load_state_dict(model.state_dict())  # strict: the same keys both ways
    torch.testing.assert_close(other(x), y, rtol=1e-10, atol=1e-12)
    save_adapter(model, tmp_path)
    loaded = load_adapter(make(), tmp_path)
    torch.testing.assert_close(loaded(x), y, rtol=1e-10, atol=1e-12)
    delete_adapter(model, "default")
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-12)
    assert not list(stacks(model)) and not any("adapter" in k for k in model.state_dict())


def test_merge_unmerge_merge_and_unload():
    model = inject(_net(), _cfg())
    _randomise(model)
    x = _x()
    y = model(x)
    merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    plain = _net().state_dict()  # state_dict keeps the plain model's base weights while merged
    got = model.state_dict()
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=1e-12, atol=1e-12)
    unmerge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    plain = merge_and_unload(model)
    torch.testing.assert_close(plain(x), y, rtol=1e-10, atol=1e-12)
    assert not list(stacks(plain)) and not any("adapter" in k for k in plain.state_dict())


def test_several_adapters_each_with_its_group():
    base = _net()
    x = _x()
    model = inject(copy.deepcopy(base), _cfg(), "a")
    inject(model, _cfg(kind="cp", ranks=3, stack={"qk": r"layers\.(?P<l>\d+)\.(?P<r>[qk])"},
                       target_modules=r"layers\.\d+\.[qk]"), "b")
    _randomise(model)
    ya = _reference(base, _group(model, "a"), _group(model, "a").param_dict(), x)
    set_adapter(model, "a")
    torch.testing.assert_close(model(x), ya, rtol=1e-10, atol=1e-12)
    set_adapter(model, "b")
    assert all(p.requires_grad == (".b." in n) for n, p in model.named_parameters() if "adapter_stacks" in n)
    yb = model(x)
    set_adapter(model, ["a", "b"])
    sa, sb = _group(model, "a"), _group(model, "b", "qk")
    dwa = sa.spec.reconstruct(sa.param_dict(), sa.scale)
    dwb = sb.spec.reconstruct(sb.param_dict(), sb.scale)
    w = {p: base.get_parameter(p) + dwa[i] + (dwb[sb.members[p]] if p in sb.members else 0)
         for p, i in sa.members.items()}
    torch.testing.assert_close(model(x), functional_call(base, w, (x,)), rtol=1e-10, atol=1e-12)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base(x))
    delete_adapter(model, "a")
    assert [(g, a) for _, g, a, _ in stacks(model)] == [("qk", "b")]
    torch.testing.assert_close(model(x), yb, rtol=1e-10, atol=1e-12)
    delete_adapter(model, "b")
    assert not list(stacks(model)) and list(model.state_dict()) == list(base.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_and_saves_and_loads(kind, tmp_path):
    model = inject(_net(), _cfg(kind=kind))
    x = _x()
    y0 = model(x)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    y = model(x)
    assert not torch.allclose(y, y0)
    save_adapter(model, tmp_path)
    fresh = _net()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), y, rtol=1e-12, atol=1e-12)
    assert len(list(stacks(fresh))) == 1


def test_load_refuses_a_model_without_exactly_those_members(tmp_path):
    model = inject(_net(), _cfg())
    _randomise(model)
    save_adapter(model, tmp_path)
    for other in (_net(2), _net(4)):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(TuckerPeftError, match="members differ from the saved ones"):
            load_adapter(other, tmp_path)
        after = other.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("edit, msg", [
    (lambda c: c["layers"]["layers.0.q.weight"].update(index=[0, 7]), "do not fill the grid"),
    (lambda c: c["layers"]["layers.0.q.weight"].update(index=[0, 1]), "do not fill the grid"),
    (lambda c: c["stacks"]["qkv"].update(modes=[["layer", ["0", "1", "2"]], ["role", ["q", "v", "k"]]]),
     "at other grid positions"),
    (lambda c: c["stacks"]["qkv"].update(modes="x"), "'modes' must list"),
    (lambda c: c["stacks"]["qkv"].update(scale=0.0), "bad entry"),
    (lambda c: c["config"]["stack"].update(qkv=r"layers\.(?P<layer>[01])\.(?P<role>[qkv])"), "members differ"),
])
def test_a_tampered_stack_file_is_refused_and_the_model_unchanged(edit, msg, tmp_path):
    from tucker_peft import _format
    model = inject(_net(), _cfg())
    _randomise(model)
    save_adapter(model, tmp_path)
    af = _format.read_adapter(tmp_path)
    edit(af.config)
    _format.write_adapter(tmp_path, af.tensors("torch"), af.config)
    other = _net()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(TuckerPeftError, match=msg):
        load_adapter(other, tmp_path)
    after = other.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).double().eval()


BERT_STACK = {"qkv": r"encoder\.layer\.(?P<layer>\d+)\.attention\.self\.(?P<role>query|key|value)"}


@pytest.mark.parametrize("kind, init", [("tucker", "zero"), ("cp", "hosvd"), ("lora", "zero")])
def test_bert_save_load_and_peft_export_round_trip(kind, init, tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[1, 5, 7, 2, 9, 3]])
    model = inject(_bert(), AdapterConfig(kind=kind, ranks=3, init=init, target_modules=["query", "key", "value"],
                                          stack=BERT_STACK))
    sd = _group(model)
    assert sd.spec.shape[:2] == (2, 3) and sd.members["encoder.layer.1.attention.self.key.weight"] == (1, 1)
    assert model.get_submodule("encoder.adapter_stacks.qkv.default") is sd  # the common ancestor, not the ModuleList
    with torch.no_grad():
        for p in sd.params.values():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
        y = model(ids).last_hidden_state
    save_adapter(model, tmp_path / "ours")
    fresh = load_adapter(_bert(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).last_hidden_state, y, rtol=1e-10, atol=1e-10)
    export_peft_lora(model, tmp_path / "peft")
    import json
    import warnings
    r = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"]
    # Tucker and CP members are a Tucker / CP of the member (the member's rank; doubled by 'hosvd', whose start
    # is subtracted by stacking); LoRA's member is a generic slice, exported as its dense ΔW at full rank.
    assert r == {"tucker": 3, "cp": 6, "lora": 16}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).last_hidden_state, y, rtol=1e-9, atol=1e-9)


# -- distributed and compiled --------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = inject(_net(), _cfg())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(3):
            loss = ddp(torch.randn(4, 6, generator=g, dtype=torch.float64)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = inject(_net(), _cfg())
        _randomise(model, std=0.1)
        mesh = init_device_mesh("cpu", (world,))
        for blk in model.layers:  # per-layer units; the group sits on the root, outside them
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            loss = model(torch.randn(4, 6, generator=g, dtype=torch.float64)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            y = model(_x())
        save_adapter(model, os.path.join(out, "ad"))
        with torch.no_grad():  # load back into the sharded model: the group's values are scattered into its shards
            for p in _group(model).params.values():
                p.zero_()
        load_adapter(model, os.path.join(out, "ad"))
        with torch.no_grad():
            y2 = model(_x())
        torch.save({"y": y, "y2": y2}, os.path.join(out, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)


def test_ddp_all_reduces_the_group(tmp_path):
    _spawn(_ddp_worker, tmp_path)
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    start = inject(_net(), _cfg()).state_dict()
    keys = [k for k in r0 if "adapter_stacks" in k]
    assert keys and all(torch.equal(r0[k], r1[k]) for k in keys)  # gradients were all-reduced
    assert any(not torch.equal(r0[k], start[k]) for k in keys)
    assert all(torch.equal(r0[k], start[k]) for k in start if "adapter" not in k)  # base never changes


def test_fsdp2_trains_the_group_and_saves_it_once(tmp_path):
    _spawn(_fsdp_worker, tmp_path)
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    torch.testing.assert_close(r0["y"], r1["y"])
    torch.testing.assert_close(r0["y2"], r0["y"])
    fresh = load_adapter(_net(), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(fresh(_x()), r0["y"])
        assert not torch.allclose(fresh(_x()), _net()(_x()))


@pytest.mark.parametrize("kind, forward", [("tucker", "rebuild"), ("tucker", "factorized"), ("loha", "auto")])
def test_compile_fullgraph_matches_eager(kind, forward):
    from torch._dynamo.utils import counters
    model = inject(_net(), _cfg(kind=kind, forward=forward))
    _randomise(model)
    x = _x()

    def grads(out):
        out.square().sum().backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g

    y = model(x)
    ge = grads(y)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    yc = compiled(x)
    gc = grads(yc)
    torch.testing.assert_close(yc, y, rtol=1e-10, atol=1e-12)
    assert gc.keys() == ge.keys() and len(gc) == len(_group(model).params)
    for k in gc:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-9, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_bench_stack_quick_runs(tmp_path):
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_torch.py"), "--model", "stack", "--quick",
                           "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())["stack"]
    assert set(rec["paired_vs_per_layer"]) == {"tucker@layers", "cp@layers"}
    assert rec["trainable"]["tucker@layers"] < rec["trainable"]["tucker"]
    assert "stack tucker@layers step <= 1.3 x per-layer tucker" in proc.stdout
