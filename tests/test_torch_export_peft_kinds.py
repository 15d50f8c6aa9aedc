"""export_peft: LoHa and LoKr adapters written in PEFT's own LoHa / LoKr formats, checked by loading them
into the real peft 0.21 (``PeftModel.from_pretrained``) and comparing outputs; refusals write nothing."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from torch import nn  # noqa: E402

from tucker_peft import TuckerPeftError  # noqa: E402
from tucker_peft.backends.torch import AdapterConfig, adapted_layers, export_peft, inject  # noqa: E402


class Net(nn.Module):
    """Linear, Conv2d (3×3, 1×1, grouped and dilated) and Conv1d: every layer PEFT's LoHa / LoKr adapt."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.pw = nn.Conv2d(12, 8, 1)
        self.gd = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c1 = nn.Conv1d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 16)

    def forward(self, x):
        h = self.gd(torch.tanh(self.pw(torch.tanh(self.conv(x)))))
        h = self.c1(h.mean(2))
        return self.fc(h.mean(2))


def _base():
    torch.manual_seed(0)
    return Net().double()


X = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _trained(config):
    """The base with the adapter, after two Adam steps (so PEFT's zero block is nonzero too)."""
    m = inject(_base(), config)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        m(X).square().mean().backward()
        opt.step()
    return m


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_base(), str(path))


def _check(m, path, peft_type):
    assert export_peft(m, path) == peft_type
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type
    loaded = _load(path)
    layer = {"LOHA": peft.tuners.loha.LoHaLayer, "LOKR": peft.tuners.lokr.LoKrLayer, "LORA": peft.tuners.lora.LoraLayer}
    kinds = {type(mod).__module__ for mod in loaded.modules() if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert kinds == {layer[peft_type].__module__}  # PEFT built layers of that type only
    with torch.no_grad():
        want, got, base = m(X), loaded(X), _base()(X)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output, so equality below is not vacuous
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return cfg, loaded


ALL = ["conv", "pw", "gd", "c1", "fc"]


@pytest.mark.parametrize("r", [1, 2, 3, 6])
def test_loha_loads_in_peft_with_equal_outputs(tmp_path, r):
    m = _trained(AdapterConfig(kind="loha", ranks=r, alpha=0.7, target_modules=ALL))
    cfg, loaded = _check(m, tmp_path, "LOHA")
    assert cfg["use_effective_conv2d"] is False
    # PEFT built its layers at our ranks (rank_pattern where a layer's rank was clipped below r)
    want = {h.layer_name: d.spec.rank for _, h in adapted_layers(m) for d in h.adapters.values()}
    got = {n.removeprefix("base_model.model."): mod.r["default"] for n, mod in loaded.named_modules()
           if isinstance(mod, peft.tuners.loha.LoHaLayer)}
    assert got == want


LOKR = [dict(ranks=1), dict(ranks=2), dict(ranks=8),
        dict(budget="lora:2", kind_options={"factor": 2}),
        dict(budget="lora:2", kind_options={"decompose_both": True}),
        dict(budget="lora:3", kind_options={"factor": 4, "decompose_both": True})]


@pytest.mark.parametrize("opts", LOKR, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_lokr_loads_in_peft_with_equal_outputs(tmp_path, opts):
    targets = ["conv", "pw", "gd", "fc"]
    m = _trained(AdapterConfig(kind="lokr", alpha=1.3, target_modules=targets, **opts))
    specs = {h.layer_name: d.spec for _, h in adapted_layers(m) for d in h.adapters.values()}
    cfg, loaded = _check(m, tmp_path, "LOKR")
    ko = opts.get("kind_options", {})
    assert (cfg["decompose_factor"], cfg["decompose_both"]) == (ko.get("factor", -1), ko.get("decompose_both", False))
    for n, mod in loaded.named_modules():
        if isinstance(mod, peft.tuners.lokr.LoKrLayer):
            s = specs[n.removeprefix("base_model.model.")]
            names = {k.removeprefix("lokr_") for k in mod.adapter_layer_names if "default" in getattr(mod, k)}
            assert names == set(s.param_shapes)


def test_lokr_conv1d_low_rank_exports_and_full_w2_is_refused(tmp_path):
    m = _trained(AdapterConfig(kind="lokr", ranks=1, target_modules=["c1", "fc"]))
    _check(m, tmp_path / "ok", "LOKR")
    m = _trained(AdapterConfig(kind="lokr", ranks=2, target_modules=["c1", "fc"]))  # c1: 12=(3,4), 8=(2,4); 2 >= 4/2
    with pytest.raises(TuckerPeftError, match="Conv1d LoKr"):
        export_peft(m, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_other_kinds_go_to_peft_lora(tmp_path):
    m = _trained(AdapterConfig(kind="tucker", ranks=2, target_modules=["conv", "fc"]))
    _check(m, tmp_path, "LORA")


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.refl = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv3d(4, 4, 1)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.inner = nn.Module()
        self.inner.w = nn.Parameter(torch.randn(4, 6))  # a bare parameter: adapted through a parametrization


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("target,match", [("refl", "padding_mode"), ("c3", "Conv3d"), ("emb", "Embedding")])
def test_refusals_write_nothing(tmp_path, kind, target, match):
    m = inject(Odd().double(), AdapterConfig(kind=kind, ranks=1, target_modules=["fc", target]))
    for _, h in adapted_layers(m):
        for p in h.adapters["default"].params.values():
            p.data.normal_()
    with pytest.raises(TuckerPeftError, match=match):
        export_peft(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parameter_adapter_and_hosvd_are_refused(tmp_path):
    m = inject(Odd().double(), AdapterConfig(kind="loha", ranks=1, target_parameters=["inner.w"]))
    with pytest.raises(TuckerPeftError, match="parameter adapters"):
        export_peft(m, tmp_path / "p")
    m = inject(Odd().double(), AdapterConfig(kind="loha", ranks=1, init="hosvd", target_modules=["fc"]))
    with pytest.raises(TuckerPeftError, match="hosvd"):
        export_peft(m, tmp_path / "h")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("other", ["lokr", "tucker"])
def test_mixed_formats_in_one_adapter_are_refused(tmp_path, other):
    m = inject(_base(), AdapterConfig(kind="loha", ranks=2, target_modules=["fc"]))
    inject(m, AdapterConfig(kind=other, ranks=1, target_modules=["conv"]))  # same adapter name, another kind
    with pytest.raises(TuckerPeftError, match="mixes kinds"):
        export_peft(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()
