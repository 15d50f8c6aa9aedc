"""A kind defined in this test module (not the package), written only against the public kind contract,
run end to end through the torch binding and the CLI; and the three newer built-in kinds through the binding.

The reference is always dense: W + s·ΔW with ΔW from the formula written here (or, for built-in kinds, from the
core's reconstruct, itself tested against dense formulas elsewhere), run through plain torch modules."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import _base
from tucker_peft import testing as tpst
from tucker_peft._errors import RankError

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from tucker_peft.backends.torch import (AdapterConfig, adapted_layers, inject, load_adapter, merge,  # noqa: E402
                                        save_adapter, unmerge)


@dataclass(frozen=True)
class GatedLoRA(tp.Parametrization):
    """ΔW = B · diag(g) · A on the mode-0 unfolding ``(out, Π shape[1:])``.

    Params ``B (out, r)``, ``g (r,)``, ``A (r, Π shape[1:])``; zero init: g = 0; principal init: SVD.
    """

    rank: int = 1

    kind: ClassVar[str] = "gatedlora"
    init_methods: ClassVar[dict[str, str]] = {"zero": "zero", "random": "random", "svd": "svd"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"svd"})
    principal_init: ClassVar[str | None] = "svd"

    def __post_init__(self) -> None:
        top = min(self.shape[0], math.prod(self.shape[1:]))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= top:
            raise RankError(f"rank (gatedlora of shape {self.shape}): expected an int in [1, {top}], got {self.rank!r}")

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"B": (self.shape[0], self.rank), "g": (self.rank,), "A": (self.rank, math.prod(self.shape[1:]))}

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        r = self.rank_symbol(0)
        return (("B", (self.shape[0], self.rank), self.mode_symbol(0) + r), ("g", (self.rank,), r),
                ("A", (self.rank, *self.shape[1:]), r + self.output_subscripts[1:]))

    def initialize(self, method, ctx, rng, tensor, scale, options):
        o, k = self.shape[0], math.prod(self.shape[1:])
        if method == "svd":
            u, s, vt = np.linalg.svd(np.asarray(tensor, dtype=np.float64).reshape(o, k), full_matrices=False)
            r = self.rank
            return {"B": ctx.asarray(u[:, :r]), "g": ctx.asarray(s[:r] / scale), "A": ctx.asarray(vt[:r])}
        g = np.zeros(self.rank) if method == "zero" else rng.standard_normal(self.rank)
        return {"B": ctx.asarray(rng.standard_normal((o, self.rank)) / math.sqrt(self.rank)), "g": ctx.asarray(g),
                "A": ctx.asarray(rng.uniform(-1, 1, (self.rank, k)) / math.sqrt(k))}

    def factored(self, params, scale=1.0):
        if len(self.shape) < 2:
            return None
        a = params["A"] * (params["g"] * scale)[:, None]
        return params["B"], a.reshape(self.rank, *self.shape[1:]), None, 1

    @classmethod
    def clip(cls, shape, ranks):
        return min(ranks, shape[0], math.prod(shape[1:])) if isinstance(ranks, int) else ranks

    @classmethod
    def budget_family(cls, shape, **constraints):
        shape = tuple(shape)
        return (lambda t: cls(shape, t)), min(shape[0], math.prod(shape[1:]))


@dataclass(frozen=True)
class GatedLoRARebuild(GatedLoRA):
    """The same kind without a three-stage form: the binding must rebuild ΔW."""

    kind: ClassVar[str] = "gatedlora_rebuild"

    def factored(self, params, scale=1.0):
        return None


PLUGINS = {"gatedlora": GatedLoRA, "gatedlora_rebuild": GatedLoRARebuild}


@pytest.fixture
def plugins():
    for name, cls in PLUGINS.items():
        tp.register(name, cls, overwrite=True)
    yield PLUGINS
    for name in PLUGINS:
        _base._REGISTRY.pop(name, None)


def _dense(spec, params, scale):
    """s·ΔW: this module's own formula for the plugin kinds, the core's reconstruct for built-in ones."""
    if isinstance(spec, GatedLoRA):
        return scale * ((params["B"] * params["g"]) @ params["A"]).reshape(spec.shape)
    return spec.reconstruct(params, scale)


# -- the spec API and the property strategies ------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_plugin_spec_api_under_the_property_strategies(plugins, data):
    kind = data.draw(st.sampled_from(sorted(PLUGINS)))
    spec, p = data.draw(tpst.spec_and_params(kinds=[kind], shape_strategy=tpst.shapes(min_ndim=2, max_ndim=4,
                                                                                         max_side=4)))
    np.testing.assert_allclose(spec.reconstruct(p, 0.7), _dense(spec, p, 0.7), rtol=1e-10, atol=1e-10)
    ct = data.draw(tpst.cotangents(spec))
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    (spec.reconstruct(tparams, 0.7) * torch.tensor(ct)).sum().backward()
    for k, g in spec.vjp(p, ct, 0.7).items():
        np.testing.assert_allclose(g, tparams[k].grad.numpy(), rtol=1e-9, atol=1e-9)
    assert spec.num_params == spec.rank * (spec.shape[0] + math.prod(spec.shape[1:]) + 1)
    assert not np.any(spec.reconstruct(spec.init("zero", seed=1)))
    b, a = spec.lora_factors(p, 0.7) or (None, None)
    if kind == "gatedlora":  # derived from factored(): exact
        np.testing.assert_allclose((b @ a).reshape(spec.shape), _dense(spec, p, 0.7), rtol=1e-10, atol=1e-10)
    else:
        assert b is None


# -- the torch binding ------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.experts = nn.Parameter(torch.randn(3, 5, 4) / 3)  # an N-D parameter, target_parameters

    def forward(self, x1, x2, z):
        h1 = self.c1(x1).mean(-1)  # (n, 6)
        h2 = self.dw(torch.relu(self.c2(x2))).mean((-1, -2))  # (n, 8)
        e = torch.einsum("nd,edk->nk", z, self.experts)  # (n, 4)
        return self.lin(torch.cat([h1, h2[:, :2], e], 1)).sum(1) + h2.sum(1)


MODULES = ["lin", "c1", "c2", "dw"]


def _net():
    torch.manual_seed(0)
    return Net().double()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(4, 3, 7, generator=g, dtype=torch.float64), torch.randn(4, 6, 5, 5, generator=g,
            dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64))


def _config(kind, **kw):
    return AdapterConfig(kind=kind, budget="lora:8", target_modules=MODULES, target_parameters=["experts"],
                         alpha=1.5, **kw)


def _adapters(model):
    return {path: h.adapters["default"] for path, h in adapted_layers(model)}


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in _adapters(model).values():
            for p in d.params.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _reference(ref, adapters, x, params=None):
    """The plain model with each adapted weight replaced by W + s·ΔW (dense)."""
    weights = {}
    for path, d in adapters.items():
        p = dict(d.params) if params is None else params[path]
        weights[path] = ref.get_parameter(path) + _dense(d.spec, p, d.scale)
    return functional_call(ref, weights, x)


@pytest.mark.parametrize("kind", ["gatedlora", "gatedlora_rebuild", "tt", "lokr", "loha"])
def test_kind_end_to_end_through_the_torch_binding(plugins, kind, tmp_path):
    ref = _net()
    model = inject(_net(), _config(kind))
    x = _inputs()
    adapters = _adapters(model)
    assert sorted(adapters) == ["c1.weight", "c2.weight", "dw.weight", "experts", "lin.weight"]
    cls = tp.lookup(kind)
    for path, d in adapters.items():
        assert type(d.spec) is cls and d.spec.shape == tuple(ref.get_parameter(path).shape)
        # budget='lora:8': the kind's largest spec within LoRA rank 8's count (capped at the weight's size)
        shape = d.spec.shape
        out, k = shape[0], math.prod(shape[1:])
        budget = min(tp.LoRA(shape, min(8, out, k)).num_params, math.prod(shape))
        assert d.spec.num_params <= budget
        assert d.spec == tp.ranks.for_budget(kind, shape, budget)
        assert d.scale == pytest.approx(1.5 * d.spec.matched_scale())
        # a kind with a three-stage form gets the fused/factorised ops, one without rebuilds ΔW
        assert d._structured == (d.spec.factored(dict(d.params)) is not None)
        if kind.startswith("gatedlora"):
            assert d._structured == (kind == "gatedlora")
    if kind == "gatedlora":  # its zero init is a zero gate: ΔW = 0 while B, A are random
        assert all(not d.params["g"].any() and d.params["B"].any() for d in adapters.values())
    torch.testing.assert_close(model(*x), ref(*x))  # ΔW = 0 at init
    _perturb(model)
    y = model(*x)
    torch.testing.assert_close(y, _reference(ref, adapters, x))

    # a training step: gradients equal autograd through the dense reference, and the loss goes down
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    loss = ((model(*x) - target) ** 2).mean()
    loss.backward()
    leaves = {path: {n: p.detach().clone().requires_grad_(True) for n, p in d.params.items()}
              for path, d in adapters.items()}
    ((_reference(ref, adapters, x, leaves) - target) ** 2).mean().backward()
    for path, d in adapters.items():
        for n, p in d.params.items():
            torch.testing.assert_close(p.grad, leaves[path][n].grad, msg=f"{kind} {path} {n}")
    assert not any(p.grad is not None for n, p in model.named_parameters() if "adapters" not in n
                   and "experts" not in n.split(".")[-1])  # base frozen
    opt = torch.optim.SGD([p for d in adapters.values() for p in d.params.values()], lr=1e-2)
    before = {(path, n): p.detach().clone() for path, d in adapters.items() for n, p in d.params.items()}
    opt.step()
    assert any(not torch.equal(p, before[(path, n)]) for path, d in adapters.items() for n, p in d.params.items())
    with torch.no_grad():
        y2 = model(*x)
        assert ((y2 - target) ** 2).mean() < loss.detach()
        torch.testing.assert_close(y2, _reference(ref, adapters, x))

    # save, and load into a fresh model: equal outputs
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(_net(), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), y2)

    # merge and unmerge
    weights = {path: ref.get_parameter(path).detach().clone() for path in adapters}
    with torch.no_grad():
        merge(model)
        torch.testing.assert_close(model(*x), y2)
        for path in ("lin.weight", "c2.weight"):
            base = model.get_submodule(path.rpartition(".")[0]).base_layer.weight
            d = adapters[path]
            torch.testing.assert_close(base, weights[path] + _dense(d.spec, dict(d.params), d.scale))
        unmerge(model)
        torch.testing.assert_close(model(*x), y2)
        for path in ("lin.weight", "c2.weight"):
            torch.testing.assert_close(model.get_submodule(path.rpartition(".")[0]).base_layer.weight, weights[path])


def test_plugin_kind_must_be_registered_to_load_and_export_says_why(plugins, tmp_path):
    from tucker_peft.backends.torch import export_peft_lora

    model = inject(_net(), AdapterConfig(kind="gatedlora_rebuild", ranks=2, target_modules=["lin"]))
    save_adapter(model, tmp_path / "ad")
    before = {k: v.clone() for k, v in _net().state_dict().items()}
    _base._REGISTRY.pop("gatedlora_rebuild")
    fresh = _net()
    with pytest.raises(tp.TuckerPeftError, match="gatedlora_rebuild"):
        load_adapter(fresh, tmp_path / "ad")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    tp.register("gatedlora_rebuild", GatedLoRARebuild)
    with pytest.raises(tp.TuckerPeftError, match="kind 'gatedlora_rebuild' cannot be written as an exact LoRA"):
        export_peft_lora(model, tmp_path / "peft")
    # with a three-stage form the kind exports exactly
    model = inject(_net(), AdapterConfig(kind="gatedlora", ranks=2, target_modules=["lin"]))
    _perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_peft_lora(model, tmp_path / "peft")


@pytest.mark.parametrize("init", ["zero", "hosvd"])
def test_lokr_exports_exactly_to_peft_lora_even_from_an_hosvd_start(tmp_path, init):
    """LoKr's lora_factors (kron of the factor pairs) make export_peft_lora exact; an 'hosvd' start, which PEFT's
    LoKr format cannot hold (one Kronecker product, not f(params) - f(start)), goes this way."""
    peft = pytest.importorskip("peft")
    from tucker_peft.backends.torch import export_peft, export_peft_lora

    model = inject(_net(), AdapterConfig(kind="lokr", ranks=2, init=init, target_modules=MODULES))
    _perturb(model)
    if init == "hosvd":  # on layers PEFT's LoKr takes (not c1: a full 3-D W2), refused for the start alone
        native = inject(_net(), AdapterConfig(kind="lokr", ranks=2, init=init, target_modules=["lin", "c2"]))
        with pytest.raises(tp.TuckerPeftError, match="init='hosvd'.*export_peft_lora"):
            export_peft(native, tmp_path / "native")
        assert not (tmp_path / "native").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size warning: kron(U1, U2) has rank rank(W1)·rank(W2)
        export_peft_lora(model, tmp_path / "peft")
        loaded = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "peft"))
    x = _inputs()
    with torch.no_grad():
        want, got, base = model(*x), loaded(*x), _net()(*x)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output: equality below is not vacuous
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_hosvd_init_uses_the_kinds_principal_init(plugins):
    ref = _net()
    model = inject(_net(), AdapterConfig(kind="gatedlora", ranks=12, init="hosvd", target_modules=["lin"]))
    d = _adapters(model)["lin.weight"]
    # the full-rank SVD of W: s·ΔW₀ = W, and the base holds the residual W − s·ΔW₀ ≈ 0
    torch.testing.assert_close(_dense(d.spec, dict(d.params), d.scale), ref.lin.weight.detach())
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), ref(*x))


# -- the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gatedlora", "tests.test_kind_plugin:GatedLoRA"])
def test_extract_with_a_plugin_kind(plugins, kind, tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    from tucker_peft.adapter import spec_from_json
    from tucker_peft.cli import main

    rng = np.random.default_rng(0)
    base = {"a.weight": rng.standard_normal((16, 12)).astype(np.float32),
            "b.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32)}
    tuned = {}
    for n, w in base.items():  # a rank-2 change
        u, v = rng.standard_normal((w.shape[0], 2)), rng.standard_normal((2, math.prod(w.shape[1:])))
        tuned[n] = (w + (u @ v).reshape(w.shape)).astype(np.float32)
    safetensors_numpy.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors_numpy.save_file(tuned, str(tmp_path / "t.safetensors"))
    out = tmp_path / "ad"
    rc = main(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--kind", kind,
               "--match", "lora:3", "-o", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    import json

    with safe_open(str(out / "tucker_peft_adapter.safetensors"), framework="numpy") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for n in base:
        spec = spec_from_json(json.dumps(config["layers"][n]["spec"]))
        assert type(spec) is GatedLoRA and spec.rank == 2  # lora:3's count buys gated rank 2
        p = {k: tensors[f"{n}::{k}"].astype(np.float64) for k in spec.param_shapes}
        dw = tuned[n].astype(np.float64) - base[n]
        np.testing.assert_allclose(_dense(spec, p, 1.0), dw, rtol=1e-4, atol=1e-4)


def test_ranks_command_takes_plugin_kinds_by_name_and_module_class(plugins, tmp_path, capsys):
    import json

    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from tucker_peft.cli import main

    path = str(tmp_path / "m.safetensors")
    safetensors_numpy.save_file({"a.weight": np.zeros((16, 12), np.float32)}, path)
    ref = "tests.test_kind_plugin:GatedLoRA"
    rc = main(["ranks", path, "--match", f"{ref}:3", "--kinds", f"gatedlora,lora,{ref}", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (row,) = json.loads(out)["tensors"]
    budget = GatedLoRA((16, 12), 3).num_params  # the match reference: KIND:R with KIND itself 'module:Class'
    for k in ("gatedlora", ref):
        assert row["specs"][k]["num_params"] == tp.ranks.for_budget("gatedlora", (16, 12), budget).num_params
        assert row["specs"][k]["ranks"] == "3"
    assert row["specs"]["lora"]["ranks"] == str(budget // 28)
    rc = main(["ranks", path, "--budget", "100", "--kinds", "gatedlora,nope:Nothing"])
    assert rc == 2 and "nope:Nothing" in capsys.readouterr().err


@dataclass(frozen=True)
class GatedLoRAIn(GatedLoRA):
    """GatedLoRA whose energy rule reads the input side: the rank of the mode-1 unfolding."""

    kind: ClassVar[str] = "gatedlora_in"

    @classmethod
    def for_energy(cls, shape, energy, rank_of):
        if energy[1] is None:
            raise RankError("gatedlora_in takes its rank from the energy of mode 1, got 'none' there")
        return cls.for_ranks(shape, rank_of(1, energy[1]))


def test_extract_energy_asks_the_kind_which_modes_it_reads(plugins, tmp_path, capsys):
    import json

    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    from tucker_peft.cli import main

    rng = np.random.default_rng(0)
    base = {"a.weight": rng.standard_normal((16, 12)).astype(np.float32),
            "b.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32)}
    tuned = {n: (w + (rng.standard_normal((w.shape[0], 2)) @ rng.standard_normal((2, w[0].size))).reshape(w.shape))
             .astype(np.float32) for n, w in base.items()}  # rank 2 on mode 0; on mode 1 of the conv, 4
    safetensors_numpy.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors_numpy.save_file(tuned, str(tmp_path / "t.safetensors"))

    def ref_rank(n, mode):  # the smallest rank keeping 0.9999 of the unfolding's σ², by numpy
        dw = tuned[n].astype(np.float64) - base[n]
        s2 = np.linalg.svd(np.moveaxis(dw, mode, 0).reshape(dw.shape[mode], -1), compute_uv=False) ** 2
        return int(np.argmax(np.cumsum(s2) / s2.sum() >= 0.9999)) + 1

    def extract(kind, energy, out):
        return main(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--kind", kind,
                     "--energy", energy, "-o", str(tmp_path / out), "-q"])

    def ranks(out):
        with safe_open(str(tmp_path / out / "tucker_peft_adapter.safetensors"), framework="numpy") as f:
            return {n: v["spec"]["rank"] for n, v in json.loads(f.metadata()["config"])["layers"].items()}

    tp.register("gatedlora_in", GatedLoRAIn)
    try:
        assert extract("gatedlora", "0.9999", "a0") == 0, capsys.readouterr().err
        assert ranks("a0") == {n: ref_rank(n, 0) for n in base} == {"a.weight": 2, "b.weight": 2}
        assert extract("gatedlora_in", "none,0.9999", "a1") == 0, capsys.readouterr().err
        assert ranks("a1") == {n: ref_rank(n, 1) for n in base} and ranks("a1")["b.weight"] == 4
        capsys.readouterr()
        assert extract("gatedlora", "none,0.9999", "a2") == 2  # the default kind reads mode 0: refused up front
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "gatedlora takes its rank from the energy of mode 0" in err
        assert not (tmp_path / "a2").exists()
    finally:
        _base._REGISTRY.pop("gatedlora_in", None)


@dataclass(frozen=True)
class GatedLoRAShown(GatedLoRA):
    """GatedLoRA with neither a ``ranks`` nor a ``rank`` field name the summary could guess from."""

    kind: ClassVar[str] = "gatedlora_shown"

    def describe_ranks(self):
        return f"g{self.rank}"


def test_summary_shows_ranks_as_each_kind_describes_them(plugins):
    from tucker_peft.backends.torch import summary

    tp.register("gatedlora_shown", GatedLoRAShown)
    try:
        for kind, want in [("gatedlora_shown", "g"), ("tt", None), ("lokr", None)]:
            model = inject(_net(), AdapterConfig(kind=kind, ranks=2, target_modules=["lin", "c2"]))
            rows = summary(model).rows
            specs = {p.rsplit(".", 1)[0]: d.spec for p, d in _adapters(model).items()}
            assert [r["ranks"] for r in rows] == [specs[r["layer"]].describe_ranks() for r in rows]
            if want:
                assert all(r["ranks"].startswith(want) for r in rows)
    finally:
        _base._REGISTRY.pop("gatedlora_shown", None)


def test_loha_effective_conv_trains_and_exports_to_peft_with_equal_outputs(tmp_path, r=4):
    """kind_options={'effective_conv': True} is PEFT's use_effective_conv2d: Tucker-2 halves on conv kernels
    (Conv1d, Conv2d, grouped and dilated), flat on 1×1 convs and Linear, as PEFT decides per layer."""
    peft = pytest.importorskip("peft")
    from tests.test_torch_export_peft_kinds import ALL, _check, _trained

    m = _trained(AdapterConfig(kind="loha", budget=f"lora:{r}", kind_options={"effective_conv": True},
                               target_modules=ALL, alpha=0.7))
    specs = {h.layer_name: d.spec for _, h in adapted_layers(m) for d in h.adapters.values()}
    assert {n for n, s in specs.items() if s.effective} == {"conv", "gd", "c1"}  # not pw (1×1) nor fc
    assert all(s.num_params <= tp.LoRA(s.shape, min(r, s.shape[0])).num_params for s in specs.values())
    cfg, loaded = _check(m, tmp_path, "LOHA")  # 2 Adam steps here, then PEFT's outputs equal ours
    assert cfg["use_effective_conv2d"] is True
    built = {n.removeprefix("base_model.model."): "default" in mod.hada_t1 for n, mod in loaded.named_modules()
             if isinstance(mod, peft.tuners.loha.LoHaLayer)}
    assert built == {n: s.effective for n, s in specs.items()}  # PEFT made cores exactly where we have them
    from tests.test_torch_export_peft_kinds import X, _base

    save_adapter(m, tmp_path / "ad")  # the option survives save and load
    fresh = load_adapter(_base(), tmp_path / "ad")
    assert {h.layer_name: d.spec for _, h in adapted_layers(fresh) for d in h.adapters.values()} == specs
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), m(X))


def test_lokr_effective_conv_trains_and_exports_to_peft_with_equal_outputs(tmp_path):
    """kind_options={'effective_conv': True} is PEFT LoKr's use_effective_conv2d: a low-rank W2 on a kernel is a
    Tucker-2 (lokr_t2); full W2, 1×1 convs and Linear stay as they were, as PEFT decides."""
    peft = pytest.importorskip("peft")
    from tests.test_torch_export_peft_kinds import ALL, _check, _trained
    from tucker_peft.backends.torch import export_peft

    def config(targets):
        return AdapterConfig(kind="lokr", budget="lora:1", kind_options={"effective_conv": True},
                             target_modules=targets, alpha=0.7)

    # PEFT's own Conv1d LoKr with use_effective_conv2d fails (peft 0.21), so export refuses that layer
    net = nn.Sequential(nn.Conv1d(8, 12, 3, padding=1)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(net, peft.LoKrConfig(r=1, target_modules=["0"], use_effective_conv2d=True,
                                                      init_weights=False))
    with pytest.raises(RuntimeError):
        pm(torch.randn(2, 8, 5, dtype=torch.float64))
    m = _trained(config(ALL))
    assert dict(adapted_layers(m))["c1.weight"].adapters["default"].spec.effective
    with pytest.raises(tp.TuckerPeftError, match="Conv1d.*effective_conv"):
        export_peft(m, tmp_path / "c1")
    assert not (tmp_path / "c1").exists()

    m = _trained(config([t for t in ALL if t != "c1"]))
    specs = {h.layer_name: d.spec for _, h in adapted_layers(m) for d in h.adapters.values()}
    assert {n for n, s in specs.items() if s.effective} >= {"conv"}  # Conv2d 3×3
    assert not specs["pw"].effective and not specs["fc"].effective
    cfg, loaded = _check(m, tmp_path, "LOKR")  # 2 Adam steps here, then PEFT's outputs equal ours
    assert cfg["use_effective_conv2d"] is True
    built = {n.removeprefix("base_model.model."): "default" in mod.lokr_t2 for n, mod in loaded.named_modules()
             if isinstance(mod, peft.tuners.lokr.LoKrLayer)}
    assert built == {n: s.effective for n, s in specs.items()}  # PEFT made t2 exactly where we have it
