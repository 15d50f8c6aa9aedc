"""PyTorch binding: every adapted layer type against a dense reference (float64), gradients included."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from tucker_peft.backends.torch import AdapterConfig, adapted_layers, inject  # noqa: E402

KINDS = ["tucker", "tucker2", "cp", "lora"]
FORWARDS = ["rebuild", "rebuild-full", "factorized"]  # rebuild-full: the fused backward via one full ∂W


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, h in adapted_layers(model):
        for d in h.adapters.values():
            for p in d.params.values():
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _reference(layer: nn.Module, x: torch.Tensor, cot: torch.Tensor):
    """Output and gradients of the base layer run with W + s·ΔW built by the core, by autograd."""
    (path, h), = list(adapted_layers(layer))
    d = h.adapters[h.active_adapter]
    base = copy.deepcopy(h.base_layer)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in d.params.items()}
    w = base.weight.detach() + d.spec.reconstruct(params, d.scale)
    del base.weight
    base.weight = w
    xr = x.detach().clone().requires_grad_(x.is_floating_point())
    y = base(xr)
    (y * cot).sum().backward()
    return y.detach(), xr.grad, {k: v.grad for k, v in params.items()}


def _check(layer: nn.Module, x: torch.Tensor, forward: str) -> None:
    for _, h in adapted_layers(layer):
        for d in h.adapters.values():
            d.forward_mode = forward.split("-")[0]
            d._staged = forward == "rebuild"
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = layer(x)
    cot = torch.randn_like(y)
    y_ref, gx_ref, g_ref = _reference(layer, x, cot)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    (y * cot).sum().backward()
    if x.is_floating_point():
        torch.testing.assert_close(x.grad, gx_ref, rtol=1e-9, atol=1e-9)
    (_, h), = list(adapted_layers(layer))
    for k, p in h.adapters[h.active_adapter].params.items():
        torch.testing.assert_close(p.grad, g_ref[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"{k}: {m}")


def _wrap(layer: nn.Module, kind: str, ranks=3, **kw) -> nn.Module:
    model = nn.Sequential(layer).double()
    inject(model, AdapterConfig(kind=kind, ranks=ranks, target_modules=["0"], alpha=0.7, **kw))
    _randomise(model)
    return model


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
def test_linear_matches_dense(kind, forward):
    model = _wrap(nn.Linear(7, 5), kind)
    _check(model, torch.randn(2, 3, 7, dtype=torch.float64), forward)


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
def test_linear_without_bias(kind, forward):
    model = _wrap(nn.Linear(6, 9, bias=False), kind)
    _check(model, torch.randn(4, 6, dtype=torch.float64), forward)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [2, 400])
def test_linear_fused_backward_either_input_gradient(kind, rows):
    """The fused backward takes ∂L/∂x as dy·W + the stages' chain for few rows, through W + ΔW for many: both
    equal the dense reference."""
    from tucker_peft.backends.torch._ops import dx_by_stages

    model = _wrap(nn.Linear(24, 20), kind, ranks=2)
    (_, h), = list(adapted_layers(model))
    d = h.adapters["default"]
    p_out, s, p_in, mg = d.views()
    assert dx_by_stages(h.geometry, (20, 24), p_out, tuple(s.shape), p_in, mg, rows) == (rows == 2)
    _check(model, torch.randn(rows, 24, dtype=torch.float64), "rebuild")


@pytest.mark.parametrize("forward", ["rebuild", "factorized"])
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_matches_dense(kind, forward):
    model = _wrap(nn.Embedding(11, 6, padding_idx=0), kind)
    _check(model, torch.randint(0, 11, (3, 4)), forward)


CONVS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
    ("conv1d-same-reflect", lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect"), (2, 4, 9)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 6)),
    ("conv2d-stride-dilation", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)), (2, 4, 9, 8)),
    ("conv2d-same-even-kernel", lambda: nn.Conv2d(3, 5, 4, padding="same"), (2, 3, 7, 7)),
    ("conv2d-circular", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 6, 6)),
    ("conv2d-replicate-valid", lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate", bias=False), (2, 4, 6, 6)),
    ("conv2d-grouped", lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1), (2, 6, 6, 5)),
    ("conv2d-depthwise", lambda: nn.Conv2d(5, 5, 5, groups=5, padding=2), (2, 5, 7, 7)),
    ("conv2d-depthwise-multiplier", lambda: nn.Conv2d(4, 8, 3, groups=4, stride=2), (2, 4, 7, 7)),
    ("conv2d-unbatched", lambda: nn.Conv2d(3, 4, 3), (3, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 1), padding=1, groups=1), (2, 3, 4, 5, 5)),
]


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make, shape", [c[1:] for c in CONVS], ids=[c[0] for c in CONVS])
def test_conv_matches_dense(make, shape, kind, forward):
    torch.manual_seed(0)
    model = _wrap(make(), kind)
    _check(model, torch.randn(*shape, dtype=torch.float64), forward)


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad = draw(st.sampled_from(["int", "same", "valid"])) if stride == (1,) * nd else draw(st.sampled_from(["int", "valid"]))
    padding = tuple(draw(st.integers(0, 1)) for _ in range(nd)) if pad == "int" else pad
    if mode != "zeros" and padding == "valid":
        mode = "zeros"
    size = tuple(draw(st.integers(3, 6)) + (kk - 1) * dd for kk, dd in zip(k, dilation))
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1](cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                                                     groups=groups, bias=draw(st.booleans()), padding_mode=mode)
    kind = draw(st.sampled_from(KINDS))
    ranks = draw(st.integers(1, 4))
    return conv, (draw(st.integers(1, 2)), cin, *size), kind, ranks, draw(st.sampled_from(FORWARDS))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_conv_property(cfg):
    conv, shape, kind, ranks, forward = cfg
    torch.manual_seed(0)
    model = _wrap(conv, kind, ranks)
    _check(model, torch.randn(*shape, dtype=torch.float64), forward)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_by_path_matches_dense(kind):
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5, 4, dtype=torch.float64))

        def forward(self, x):  # x: (E, n, in)
            return torch.einsum("eoi,eni->eno", self.w, x)

    model = nn.Sequential(Experts())
    w0 = model[0].w.detach().clone()
    inject(model, AdapterConfig(kind=kind, ranks=2, target_parameters=["0.w"], alpha=0.5))
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), torch.einsum("eoi,eni->eno", w0, x))
    _randomise(model)
    (_, h), = list(adapted_layers(model))
    d = h.adapters["default"]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in d.params.items()}
    w = w0 + d.spec.reconstruct(params, d.scale)
    ref = torch.einsum("eoi,eni->eno", w, x)
    y = model(x)
    torch.testing.assert_close(y, ref.detach())
    cot = torch.randn_like(y)
    (y * cot).sum().backward()
    (ref * cot).sum().backward()
    for k, p in d.params.items():
        torch.testing.assert_close(p.grad, params[k].grad)


LAYERS = [
    ("linear", lambda: nn.Linear(4, 3), lambda: torch.randn(2, 4, dtype=torch.float64, requires_grad=True)),
    ("conv1d", lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 4, 3, groups=2, stride=2), lambda: torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)),
    ("conv3d", lambda: nn.Conv3d(2, 2, 2), lambda: torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)),
]


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make, make_x", [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_gradcheck(make, make_x, kind, forward):
    torch.manual_seed(1)
    model = _wrap(make(), kind, ranks=2, forward=forward.split("-")[0])
    (_, h), = list(adapted_layers(model))
    d = h.adapters["default"]
    d._staged = forward == "rebuild"
    names = list(d.params)
    x = make_x()

    ps = tuple(d.params[n].detach().clone().requires_grad_(True) for n in names)

    def g(x, *ps):
        # Rebind params functionally: torch.func keeps gradcheck's graph intact.
        return torch.func.functional_call(model, {f"0.adapters.default.params.{n}": p for n, p in zip(names, ps)}, (x,))

    assert torch.autograd.gradcheck(g, (x, *ps), eps=1e-6, atol=1e-6, fast_mode=True)


def test_zero_init_leaves_outputs_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(),
                          nn.Linear(8 * 16, 4))
    x = torch.randn(2, 3, 6, 6)
    ref = model(x)
    for kind in KINDS:
        m = copy.deepcopy(model)
        inject(m, AdapterConfig(kind=kind, ranks=4, target_modules=r"\d"))
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_hosvd_init_keeps_outputs_and_starts_from_the_weight(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Linear(6, 5)).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ref = model(x)
    w0 = model[0].weight.detach().clone()
    inject(model, AdapterConfig(kind=kind, ranks=3, target_modules=["0", "2"], init="hosvd"))
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
    (_, h) = next(adapted_layers(model))
    d = h.adapters["default"]
    # ΔW₀ is the kind's principal approximation of W: the residual is smaller than W.
    res = h.base_layer.weight.detach()
    assert res.norm() < w0.norm()
    torch.testing.assert_close(res + d.init_delta().detach(), w0)


# -- several active adapters -------------------------------------------------------

SEVERAL = [
    ("linear", lambda: nn.Linear(6, 5), lambda: torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
     lambda: torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)),
    ("embedding", lambda: nn.Embedding(9, 5), lambda: torch.randint(0, 9, (2, 4))),
]


@pytest.mark.parametrize("make, make_x", [c[1:] for c in SEVERAL], ids=[c[0] for c in SEVERAL])
def test_several_active_adapters_add_up(make, make_x):
    from tucker_peft.backends.torch import delete_adapter, disable_adapters, merge, set_adapter, unmerge

    torch.manual_seed(0)
    model = nn.Sequential(make()).double()
    plain = copy.deepcopy(model)
    w0 = model[0].weight.detach().clone()
    inject(model, AdapterConfig(kind="tucker", ranks=2, target_modules=["0"], alpha=0.7), "a")
    inject(model, AdapterConfig(kind="cp", ranks=3, target_modules=["0"], alpha=1.3), "b")
    _randomise(model)
    set_adapter(model, ["a", "b"])
    (_, h), = list(adapted_layers(model))
    assert h.active_adapters == ("a", "b") and h.active_adapter is None
    da, db = h.adapters["a"], h.adapters["b"]
    pa = {k: v.detach().clone().requires_grad_(True) for k, v in da.params.items()}
    pb = {k: v.detach().clone().requires_grad_(True) for k, v in db.params.items()}
    x = make_x()
    dense = copy.deepcopy(plain)
    del dense[0].weight
    dense[0].weight = w0 + da.spec.reconstruct(pa, da.scale) + db.spec.reconstruct(pb, db.scale)
    ref = dense(x)
    y = model(x)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(y)
    (y * cot).sum().backward()
    (ref * cot).sum().backward()
    for d, pr in ((da, pa), (db, pb)):  # both adapters train
        for k, p in d.params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0
            torch.testing.assert_close(p.grad, pr[k].grad, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        with disable_adapters(model):
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        assert h.active_adapters == ("a", "b")
        merge(model)
        assert h.merged == ("a", "b")
        torch.testing.assert_close(model(x), ref.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h.base_layer.weight, dense[0].weight.detach(), rtol=1e-12, atol=1e-12)
        unmerge(model)
        assert h.merged == ()
        torch.testing.assert_close(h.base_layer.weight, w0, rtol=0, atol=1e-14)
        delete_adapter(model, "a")
        assert h.active_adapters == ("b",)
        del dense[0].weight
        dense[0].weight = w0 + db.spec.reconstruct(pb, db.scale)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-10, atol=1e-10)


def test_several_active_adapters_on_a_parameter_and_bad_names():
    from tucker_peft.backends.torch import set_adapter
    from tucker_peft._errors import TuckerPeftError

    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 5, dtype=torch.float64))

        def forward(self, x):
            return self.w * x

    model = nn.Sequential(P())
    w0 = model[0].w.detach().clone()
    inject(model, AdapterConfig(kind="tucker", ranks=2, target_parameters=["0.w"]), "a")
    inject(model, AdapterConfig(kind="lora", ranks=2, target_parameters=["0.w"]), "b")
    _randomise(model)
    set_adapter(model, ["b", "a"])
    (_, h), = list(adapted_layers(model))
    ref = w0 + h.adapters["a"].delta_weight() + h.adapters["b"].delta_weight()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref * x)
    for bad in (["a", "a"], ["a", "nope"], [3]):
        with pytest.raises(TuckerPeftError, match="adapter_name"):
            set_adapter(model, bad)
        assert h.active_adapters == ("b", "a")  # unchanged
    with pytest.raises(AttributeError):
        h.active_adapter = "a"  # read-only: set_active is the one way in
    set_adapter(model, None)
    torch.testing.assert_close(model(x), w0 * x)


# -- no adapted layer returns a view --------------------------------------------------

VIEWS = [
    ("linear-2d", lambda: nn.Linear(5, 5), (4, 5)),
    ("linear-3d", lambda: nn.Linear(5, 5), (2, 3, 5)),
    ("conv1d", lambda: nn.Conv1d(3, 3, 3, padding=1), (2, 3, 6)),
    ("conv2d", lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), (2, 3, 5, 5)),
    ("conv2d-unbatched", lambda: nn.Conv2d(3, 3, 3, padding=1), (3, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 2, 1), (1, 2, 3, 3, 3)),
    ("hf-conv1d", lambda: pytest.importorskip("transformers.pytorch_utils").Conv1D(5, 5), (2, 3, 5)),
]


@pytest.mark.parametrize("forward", ["rebuild", "factorized"])
@pytest.mark.parametrize("make, shape", [c[1:] for c in VIEWS], ids=[c[0] for c in VIEWS])
def test_output_is_a_view_only_where_the_plain_layer_s_is(make, shape, forward):
    """``h = layer(x); h += x`` then backward works and gives the out-of-place gradients."""
    torch.manual_seed(0)
    layer = make().double()
    plain_is_view = layer(torch.randn(*shape, dtype=torch.float64))._base is not None
    model = _wrap(layer, "tucker", ranks=2, forward=forward)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    h = model(x)
    assert (h._base is not None) == plain_is_view
    h2 = model(x)
    h2 += x  # in place, as a residual block does
    cot = torch.randn_like(h2)
    g_in = torch.autograd.grad((h2 * cot).sum(), [x, *(p for p in model.parameters() if p.requires_grad)], allow_unused=True)
    g_out = torch.autograd.grad(((h + x) * cot).sum(), [x, *(p for p in model.parameters() if p.requires_grad)], allow_unused=True)
    for a, b in zip(g_in, g_out):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_embedding_output_is_not_a_view():
    model = _wrap(nn.Embedding(7, 4), "lora", ranks=2)
    assert model(torch.randint(0, 7, (2, 3)))._base is None


# -- parameters of any rank -----------------------------------------------------------

@st.composite
def nd_parameters(draw):
    nd = draw(st.integers(2, 7))
    shape = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    return shape, draw(st.sampled_from(KINDS)), draw(st.integers(1, 3))


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(nd_parameters())
@example(((2, 1, 2, 3, 1, 2), "tucker", 2))  # 6-D Tucker: IndexError in _kernel_equation before
@example(((2, 2, 1, 2, 1, 2, 2), "tucker", 3))
@example(((2, 2, 1, 2, 1, 2, 2), "cp", 2))
def test_nd_parameter_matches_dense_and_merges(cfg):
    """2-D to 7-D parameters through target_parameters: forward = (W + s·ΔW)·x, the three-stage views agree, merge."""
    from tucker_peft.backends.torch import merge_and_unload
    from tucker_peft.backends.torch._ops import Geometry

    shape, kind, ranks = cfg

    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(shape, dtype=torch.float64))

        def forward(self, x):
            return self.w * x

    torch.manual_seed(0)
    model = nn.Sequential(P())
    w0 = model[0].w.detach().clone()
    inject(model, AdapterConfig(kind=kind, ranks=ranks, target_parameters=["0.w"], alpha=0.9))
    _randomise(model)
    (_, h), = list(adapted_layers(model))
    d = h.adapters["default"]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in d.params.items()}
    dw = d.spec.reconstruct(params, d.scale)
    x = torch.randn(shape, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(y, ((w0 + dw) * x).detach(), rtol=1e-10, atol=1e-10)
    y.sum().backward()
    ((w0 + dw) * x).sum().backward()
    for k, p in d.params.items():
        torch.testing.assert_close(p.grad, params[k].grad, rtol=1e-9, atol=1e-10)
    if d._structured:  # what the fused ops and the PEFT export build on
        torch.testing.assert_close(Geometry(0).reconstruct(*d.views()), dw.detach(), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        merged = merge_and_unload(model)
        torch.testing.assert_close(merged[0].w, w0 + dw.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged(x), (w0 + dw.detach()) * x)


def test_one_dimensional_parameter_is_refused():
    from tucker_peft._errors import TuckerPeftError

    model = nn.Sequential(nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TuckerPeftError, match="at least 2 dims"):
        inject(model, AdapterConfig(kind="tucker", ranks=2, target_parameters=["0.bias"]))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- transformers' Conv1D (GPT-2 family) -------------------------------------------------

def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=12, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2Model(cfg).eval()


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
def test_conv1d_matches_dense(kind, forward):
    """ΔW in Conv1D's own (in, out) layout; y = x @ (W + s·ΔW) + b, gradients included."""
    pu = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = _wrap(pu.Conv1D(5, 7), kind)  # nf=5 outputs, nx=7 inputs: weight (7, 5)
    (_, h), = list(adapted_layers(model))
    assert h.adapters["default"].spec.shape == (7, 5)
    _check(model, torch.randn(2, 3, 7, dtype=torch.float64), forward)


def test_conv1d_gpt2_merge_save_load(tmp_path):
    from tucker_peft.backends.torch import load_adapter, merge, save_adapter, unmerge

    model = _gpt2()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = model(input_ids=ids).last_hidden_state
    w0 = model.h[0].attn.c_attn.weight.detach().clone()
    inject(model, AdapterConfig(kind="tucker", ranks=3, target_modules=["c_attn"], alpha=2.0))
    assert [p for p, _ in adapted_layers(model)] == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]
    _randomise(model)
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
        assert not torch.allclose(out, base_out, atol=1e-3)
        merge(model)
        (_, h) = next(adapted_layers(model))
        torch.testing.assert_close(h.base_layer.weight, w0 + h.adapters["default"].delta_weight())
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, out, rtol=1e-5, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(h.base_layer.weight, w0, rtol=0, atol=1e-6)
    save_adapter(model, tmp_path / "a")
    fresh = _gpt2()
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_conv1d_exports_to_peft_fan_in_fan_out(tmp_path, kind):
    """Real peft: PeftModel.from_pretrained on the exported checkpoint gives our outputs."""
    peft = pytest.importorskip("peft")
    import json

    from tucker_peft.backends.torch import export_peft_lora

    model = _gpt2().double()
    inject(model, AdapterConfig(kind=kind, ranks=3, target_modules=["c_attn"], alpha=1.5))
    _randomise(model)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=ids).last_hidden_state
    export_peft_lora(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(_gpt2().double(), str(tmp_path / "peft"))
    with torch.no_grad():
        got = pm(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, ours, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, _gpt2().double()(input_ids=ids).last_hidden_state, atol=1e-3)  # the adapter is in it


def test_binding_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, tucker_peft.backends.torch as t; t.inject; assert 'transformers' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
