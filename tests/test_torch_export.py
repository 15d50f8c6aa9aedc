"""PEFT export (checked by loading into the real peft 0.21) and weighted combination of adapters."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tucker_peft as tp  # noqa: E402
from tucker_peft.backends.torch import (AdapterConfig, adapted_layers, export_peft_lora, inject,  # noqa: E402
                                        lora_factors)

KINDS = ["tucker", "tucker2", "cp", "lora"]


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, h in adapted_layers(model):
        for d in h.adapters.values():
            for p in d.params.values():
                p.data.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _peft_load(make, path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: grouped-conv LoRA cannot merge; param rank_pattern "unmatched"
        return peft.PeftModel.from_pretrained(make(), str(path))


def _read(path):
    from safetensors.torch import load_file
    return json.loads((path / "adapter_config.json").read_text()), load_file(str(path / "adapter_model.safetensors"))


# -- anchored rank_pattern keys ------------------------------------------------------------

class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.layer = nn.Module()
        self.layer.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.layer.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.layer.conv1(torch.relu(self.conv1(x)))
        return self.layer.fc(h.mean((2, 3)))


def _nested():
    torch.manual_seed(0)
    return Nested().double()


@pytest.mark.parametrize("small", ["conv1", "layer.conv1"])
@pytest.mark.parametrize("kind", KINDS)
def test_rank_pattern_keys_name_one_module(tmp_path, kind, small):
    m = _nested()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    # the other two layers share rank 4, so `small` is the one rank_pattern entry PEFT must not apply to its namesake
    inject(m, AdapterConfig(kind=kind, ranks=4, rank_pattern={"^" + small.replace(".", r"\.") + "$": 2},
                            target_modules=["conv1", "layer.conv1", "fc"]))
    _perturb(m)
    export_peft_lora(m, tmp_path)
    cfg, _ = _read(tmp_path)
    assert len(cfg["rank_pattern"]) == 1 and cfg["r"] != next(iter(cfg["rank_pattern"].values()))
    torch.testing.assert_close(_peft_load(_nested, tmp_path)(x), m(x).detach())


# -- grouped convs at the smallest rank PEFT's format allows -----------------------------------

class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)        # out/groups = 1
        self.gc = nn.Conv2d(8, 12, 3, padding=1, groups=2)       # out/groups = 6, in/groups·k² = 36
        self.pw = nn.Conv2d(12, 12, 1, groups=4)                 # in/groups·k² = 3 < the adapter's rank
        self.full = nn.Conv2d(12, 4, 3)                          # groups = 1, out = 4 < the adapter's rank

    def forward(self, x):
        return self.full(self.pw(torch.relu(self.gc(torch.relu(self.dw(x))))))


def _grouped():
    torch.manual_seed(0)
    return Grouped().double()


def _peft_min_rank(base, dw):
    """PEFT's grouped conv: lora_B grouped, lora_A dense, r % groups == 0; block j of ΔW needs rank(ΔW_j) channels."""
    g = base.groups
    blocks = dw.reshape(g, dw.shape[0] // g, -1)
    return g * max(1, max(int(torch.linalg.matrix_rank(b)) for b in blocks))


@pytest.mark.parametrize("init", ["zero", "hosvd"])
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_conv_exports_at_the_smallest_exact_rank(tmp_path, kind, init):
    m = _grouped()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    inject(m, AdapterConfig(kind=kind, ranks=5, target_modules=["dw", "gc", "pw", "full"], init=init))
    _perturb(m)
    with pytest.warns(UserWarning, match="'dw'.*grouped-conv LoRA"):
        export_peft_lora(m, tmp_path)
    cfg, tensors = _read(tmp_path)
    for path, h in adapted_layers(m):
        d = h.adapters["default"]
        dw = (d.delta_weight() - (d.init_delta() if d.has_init else 0)).detach()
        r = tensors[f"base_model.model.{h.layer_name}.lora_A.weight"].shape[0]
        assert r <= _peft_min_rank(h.base_layer, dw), (path, r)
    torch.testing.assert_close(_peft_load(_grouped, tmp_path)(x), m(x).detach())


@pytest.mark.parametrize("kind", ["tucker", "cp"])
@pytest.mark.parametrize("conv, x_shape", [(lambda: nn.Conv1d(6, 9, 3, padding=1, groups=3), (2, 6, 7)),
                                           (lambda: nn.Conv3d(4, 4, 2, groups=4), (2, 4, 3, 3, 3))],
                         ids=["conv1d", "conv3d"])
def test_grouped_conv1d_conv3d_export(tmp_path, kind, conv, x_shape):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(conv()).double()

    m = make()
    x = torch.randn(*x_shape, dtype=torch.float64)
    inject(m, AdapterConfig(kind=kind, ranks=4, target_modules=["0"]))
    _perturb(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size warning
        export_peft_lora(m, tmp_path)
    _, tensors = _read(tmp_path)
    h = dict(adapted_layers(m))["0.weight"]
    assert tensors["base_model.model.0.lora_A.weight"].shape[0] <= _peft_min_rank(
        h.base_layer, h.adapters["default"].delta_weight().detach())
    torch.testing.assert_close(_peft_load(make, tmp_path)(x), m(x).detach())


def test_depthwise_tucker_example_exports_at_rank_groups():
    """The issue's example, scaled down 8x: Tucker ranks (7, 1, 5, 5) on a depthwise conv gave r = 7·groups."""
    from tucker_peft.backends.torch._export import _conv_tensors
    conv = nn.Conv2d(72, 72, 5, groups=72)
    m = inject(nn.Sequential(conv), AdapterConfig(kind="tucker", ranks=(7, 1, 5, 5), target_modules=["0"]))
    _perturb(m)
    h = dict(adapted_layers(m))["0.weight"]
    a, b = _conv_tensors("0", conv, h.adapters["default"])
    assert a.shape == (72, 72, 5, 5) and b.shape == (72, 1, 1, 1)
    j = torch.arange(72)
    # PEFT's grouped lora_B sends hidden channel o to output o: ΔW[o] = b[o]·a[o, o], and a[o, i≠o] = 0
    d = h.adapters["default"]  # the export computes in float64 from the params: so does the reference
    dw = d.spec.reconstruct({k: v.detach().double() for k, v in d.params.items()}, d.scale)
    torch.testing.assert_close(b.reshape(72, 1, 1, 1) * a[j, j][:, None], dw)
    off = a.clone()
    off[j, j] = 0
    assert not off.any()


def test_lora_factors_are_exact_at_most_min_dims():
    m = nn.Sequential(nn.Linear(3, 20), nn.Conv2d(16, 4, 1))
    inject(m, AdapterConfig(kind="cp", ranks=9, target_modules=["0", "1"]))
    _perturb(m)
    for _, h in adapted_layers(m):
        d = h.adapters["default"]
        b, a = lora_factors(d)
        assert b.shape[1] == min(d.spec.shape[0], a.shape[1])  # CP rank 9 > min(out, in)
        torch.testing.assert_close(b @ a, d.delta_weight().detach().double().reshape(b.shape[0], -1))


# -- parameter adapters (PEFT target_parameters / ParamWrapper) ------------------------------------

class Experts(nn.Module):
    """Stacked experts as transformers' MoE blocks hold them: (E, out, in), or (E, in, out) with is_transposed."""

    def __init__(self, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        e, d, h = 3, 6, 5
        self.gate_up = nn.Parameter(torch.randn(e, d, 2 * h) if transposed else torch.randn(e, 2 * h, d))
        self.down = nn.Parameter(torch.randn(e, h, d) if transposed else torch.randn(e, d, h))

    def forward(self, x, idx):
        gu = self.gate_up[idx]
        h = torch.einsum("bi,bio->bo", x, gu) if self.is_transposed else torch.einsum("bi,boi->bo", x, gu)
        g, u = h.chunk(2, -1)
        h = torch.nn.functional.silu(g) * u
        dn = self.down[idx]
        return torch.einsum("bi,bio->bo", h, dn) if self.is_transposed else torch.einsum("bi,boi->bo", h, dn)


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return x @ self.w.T


class Moe(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        self.experts = Experts(transposed)
        self.proj = Proj()

    def forward(self, x, idx):
        return self.experts(self.proj(x), idx)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("init", ["zero", "hosvd"])
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_adapters_export_to_peft_param_wrapper(tmp_path, kind, init, transposed):
    def make():
        torch.manual_seed(0)
        return Moe(transposed).double()

    m = make()
    x, idx = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    inject(m, AdapterConfig(kind=kind, ranks=2, init=init,
                            target_parameters=["experts.gate_up", "experts.down", "proj.w"]))
    _perturb(m)
    y = m(x, idx).detach()
    export_peft_lora(m, tmp_path)
    cfg, _ = _read(tmp_path)
    assert sorted(cfg["target_parameters"]) == ["experts.down", "experts.gate_up", "proj.w"]
    torch.testing.assert_close(_peft_load(make, tmp_path)(x, idx), y)


@pytest.mark.parametrize("kind", ["tucker", "lora"])
def test_mixtral_experts_export_to_peft(tmp_path, kind):
    """A config-built transformers Mixtral: stacked experts (E, 2·inter, hidden) and (E, hidden, inter)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)

    def make():
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(cfg).eval()

    m = make()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    y0 = m(ids).logits.detach()
    experts = "model.layers.0.mlp.experts."
    inject(m, AdapterConfig(kind=kind, ranks=3, target_modules=["q_proj"],
                            target_parameters=[experts + "gate_up_proj", experts + "down_proj"]))
    _perturb(m)
    y = m(ids).logits.detach()
    assert (y - y0).abs().max() > 1e-3
    export_peft_lora(m, tmp_path)
    torch.testing.assert_close(_peft_load(make, tmp_path)(ids).logits, y, rtol=1e-5, atol=1e-6)


def test_parameter_adapters_peft_cannot_hold_are_refused(tmp_path):
    m = nn.Module()
    m.sub = nn.Module()
    m.sub.w4 = nn.Parameter(torch.randn(2, 3, 4, 5))
    m.top = nn.Parameter(torch.randn(4, 4))
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_parameters=["sub.w4"]))
    with pytest.raises(tp.TuckerPeftError, match="takes 2-D .* and 3-D"):
        export_peft_lora(m, tmp_path / "a")
    inject(m, AdapterConfig(kind="lora", ranks=2, target_parameters=["top"]), adapter_name="b")
    with pytest.raises(tp.TuckerPeftError, match="top-level module"):
        export_peft_lora(m, tmp_path / "b", adapter_name="b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_parameters_of_one_module_adapted_apart_are_refused(tmp_path):
    from tucker_peft.backends.torch import add_adapter
    m = Moe()
    inject(m, AdapterConfig(kind="lora", ranks=2, target_parameters=["experts.down"]), adapter_name="a")
    add_adapter(m, AdapterConfig(kind="lora", ranks=2, target_parameters=["experts.gate_up", "experts.down"]),
                adapter_name="b")
    m.blk = nn.Module()
    m.blk.experts = Experts()  # PEFT's target "experts.gate_up" would also wrap "blk.experts.gate_up"
    with pytest.raises(tp.TuckerPeftError, match="also matches 'blk.experts.gate_up'"):
        export_peft_lora(m, tmp_path, adapter_name="b")
    del m.blk
    with pytest.raises(tp.TuckerPeftError, match="order in the module is unknown"):
        export_peft_lora(m, tmp_path, adapter_name="b")
    export_peft_lora(m, tmp_path, adapter_name="a")  # one parameter: no order to know


# -- weighted combination ------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)                                   # LoRA ranks 2 + 3 > min(3, 6): folded
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)           # Tucker modes 1, 2, 3 fold
        self.experts = Experts()

    def forward(self, x, idx):
        h = self.dw(torch.relu(self.conv(x))).mean((2, 3))
        return self.fc(self.experts(h, idx))


def _mixed():
    torch.manual_seed(0)
    return Mixed().double()


def _two_adapters(kind):
    from tucker_peft.backends.torch import add_adapter
    m = _mixed()
    targets = dict(target_modules=["fc", "conv", "dw"], target_parameters=["experts.gate_up"])
    inject(m, AdapterConfig(kind=kind, ranks=2, alpha=1.0, **targets), adapter_name="a")
    add_adapter(m, AdapterConfig(kind=kind, ranks=3, alpha=2.5, **targets), adapter_name="b")
    _perturb(m)
    return m


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("kind", KINDS)
def test_weighted_combination_equals_the_dense_sum(kind):
    from tucker_peft.backends.torch import add_weighted_adapter, active_adapter
    m = _two_adapters(kind)
    add_weighted_adapter(m, ["a", "b"], [0.7, -0.3], "mix")
    assert active_adapter(m) == "mix"
    ref = _mixed()
    with torch.no_grad():
        for path, h in adapted_layers(m):
            a, b, mix = (h.adapters[n].delta_weight().detach() for n in ("a", "b", "mix"))
            torch.testing.assert_close(mix, 0.7 * a - 0.3 * b, rtol=1e-12, atol=1e-12)
            ref.get_parameter(path).add_(0.7 * a - 0.3 * b)
    x, idx = _inputs()
    torch.testing.assert_close(m(x, idx), ref(x, idx))


def test_weighted_combination_of_adapters_on_different_layers():
    from tucker_peft.backends.torch import add_adapter, add_weighted_adapter
    m = _two_adapters("cp")
    add_adapter(m, AdapterConfig(kind="cp", ranks=2, target_modules=["fc"]), adapter_name="c")
    _perturb(m, seed=4)
    add_weighted_adapter(m, ["a", "c"], [2.0, 0.5], "mix")
    for path, h in adapted_layers(m):
        want = 2.0 * h.adapters["a"].delta_weight() + (0.5 * h.adapters["c"].delta_weight() if "c" in h.adapters else 0)
        torch.testing.assert_close(h.adapters["mix"].delta_weight(), want, rtol=1e-12, atol=1e-12)


def test_weighted_combination_trains_saves_and_exports_like_any_adapter(tmp_path):
    from tucker_peft.backends.torch import add_weighted_adapter, load_adapter, save_adapter
    m = _two_adapters("tucker")
    add_weighted_adapter(m, ["a", "b"], [0.5, 0.5], "mix")
    x, idx = _inputs()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(x, idx).square().sum().backward()
    opt.step()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".mix." in n for n in moved)
    y = m(x, idx).detach()
    save_adapter(m, tmp_path / "mix", adapter_name="mix")
    torch.testing.assert_close(load_adapter(_mixed(), tmp_path / "mix")(x, idx), y)
    with pytest.warns(UserWarning, match="'dw'"):
        export_peft_lora(m, tmp_path / "peft", adapter_name="mix")
    torch.testing.assert_close(_peft_load(_mixed, tmp_path / "peft")(x, idx), y)


def test_weighted_combination_refuses_what_it_cannot_hold_and_leaves_the_model_unchanged():
    from tucker_peft.backends.torch import add_adapter, add_weighted_adapter
    m = _two_adapters("tucker")
    add_adapter(m, AdapterConfig(kind="cp", ranks=2, target_modules=["fc"]), adapter_name="c")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    cases = [((["a", "c"], [1.0, 1.0], "mix"), "expected one kind"),
             ((["a", "b"], [1.0], "mix"), "weights: expected 2 finite numbers"),
             ((["a", "b"], [1.0, float("nan")], "mix"), "finite"),
             ((["a", "zz"], [1.0, 1.0], "mix"), "expected distinct names"),
             ((["a", "b"], [1.0, 1.0], "b"), "already exists"),
             (("a", [1.0], "mix"), "non-empty list")]
    for args, match in cases:
        with pytest.raises(tp.TuckerPeftError, match=match):
            add_weighted_adapter(m, *args)
    h = _mixed()
    inject(h, AdapterConfig(kind="lora", ranks=2, target_modules=["fc"], init="hosvd"), adapter_name="h")
    with pytest.raises(tp.TuckerPeftError, match="init='hosvd'"):
        add_weighted_adapter(h, ["h"], [1.0], "mix")
    after = m.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
