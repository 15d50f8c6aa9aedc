"""PyTorch binding: every adapted layer type against a dense reference (float64), gradients included."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
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
