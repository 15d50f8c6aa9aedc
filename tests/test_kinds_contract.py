"""The public kind contract: a kind written in this module (not the package), the registry and entry points,
the errors of the new kinds, and CP-ALS without tensorly's global backend."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import _base
from tucker_peft import testing as tpst
from tucker_peft._errors import RankError, TuckerPeftError


@dataclass(frozen=True)
class GatedLoRA(tp.Parametrization):
    """ΔW = B · diag(g) · A on the mode-0 unfolding; written only against the public contract."""

    rank: int = 1

    kind: ClassVar[str] = "gated_lora_test"
    init_methods: ClassVar[dict[str, str]] = {"zero": "zero", "random": "random"}

    def __post_init__(self) -> None:
        k = math.prod(self.shape[1:])
        if not 1 <= self.rank <= min(self.shape[0], k):
            raise RankError(f"rank: expected an int in [1, {min(self.shape[0], k)}], got {self.rank}")

    @property
    def param_shapes(self):
        return {"B": (self.shape[0], self.rank), "g": (self.rank,), "A": (self.rank, math.prod(self.shape[1:]))}

    def terms(self):
        r, rest = self.rank_symbol(0), self.output_subscripts[1:]
        return (("B", (self.shape[0], self.rank), self.mode_symbol(0) + r), ("g", (self.rank,), r),
                ("A", (self.rank, *self.shape[1:]), r + rest))

    def initialize(self, method, ctx, rng, tensor, scale, options):
        k = math.prod(self.shape[1:])
        return {"B": ctx.asarray(rng.standard_normal((self.shape[0], self.rank))),
                "g": ctx.zeros((self.rank,)) if method == "zero" else ctx.asarray(rng.standard_normal(self.rank)),
                "A": ctx.asarray(rng.standard_normal((self.rank, k)))}

    @classmethod
    def clip(cls, shape, ranks):
        return min(ranks, shape[0], math.prod(shape[1:]))

    @classmethod
    def budget_family(cls, shape, **constraints):
        t_max = min(shape[0], math.prod(shape[1:]))
        return (lambda t: cls(tuple(shape), t)), t_max


@pytest.fixture
def gated():
    tp.register("gated_lora_test", GatedLoRA)
    yield GatedLoRA
    _base._REGISTRY.pop("gated_lora_test", None)


def _dense_gated(p):
    return (p["B"] * p["g"]) @ p["A"]


def test_a_kind_from_outside_the_package_runs_the_spec_api(gated):
    spec = tp.parametrization("gated_lora_test", (6, 4, 3), rank=2)
    p = spec.init("random", seed=0)
    np.testing.assert_allclose(spec.reconstruct(p, 0.5), 0.5 * _dense_gated(p).reshape(6, 4, 3), atol=1e-12)
    assert spec.zero_block_size == 2  # derived from the zero init: g
    assert not np.any(spec.reconstruct(spec.init("zero", seed=1)))
    assert spec.factored(p) is None and spec.lora_factors(p) is None  # defaults: rebuild, no export
    assert spec.describe_ranks() == "2" and spec.matched_scale() == 1.0
    assert tp.lookup("gated_lora_test").for_ranks((6, 4, 3), 99) == GatedLoRA((6, 4, 3), 6)
    assert tp.ranks.for_budget("gated_lora_test", (6, 4, 3), 40) == GatedLoRA((6, 4, 3), 2)
    from tucker_peft.adapter import spec_from_json, spec_to_json

    assert spec_from_json(spec_to_json(spec)) == spec


@given(data=st.data())
def test_a_kind_from_outside_the_package_passes_the_property_strategies(gated, data):
    torch = pytest.importorskip("torch")
    spec, p = data.draw(tpst.spec_and_params(kinds=["gated_lora_test"],
                                             shape_strategy=tpst.shapes(min_ndim=2, max_ndim=4, max_side=4)))
    np.testing.assert_allclose(spec.reconstruct(p), _dense_gated(p).reshape(spec.shape), rtol=1e-10, atol=1e-10)
    ct = data.draw(tpst.cotangents(spec))
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    (spec.reconstruct(tparams, 1.5) * torch.tensor(ct)).sum().backward()
    got = spec.vjp(p, ct, 1.5)
    for k in p:
        np.testing.assert_allclose(got[k], tparams[k].grad.numpy(), rtol=1e-10, atol=1e-10)


class _FakeEntryPoint:
    def __init__(self, name, value):
        self.name, self.value, self.group = name, value, _base.ENTRY_POINT_GROUP

    def load(self):
        import importlib

        mod, _, attr = self.value.partition(":")
        return getattr(importlib.import_module(mod), attr)


@pytest.fixture
def fake_entry_points(monkeypatch):
    import importlib.metadata

    eps = [_FakeEntryPoint("ep_gated", f"{__name__}:GatedLoRA"),
           _FakeEntryPoint("ep_broken", "tucker_peft_no_such_module:Kind")]
    calls = []

    def entry_points(group=None, **kw):
        calls.append(group)
        return [e for e in eps if e.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(_base, "_SCANNED", False)
    monkeypatch.setattr(_base, "_PENDING", {})
    yield calls
    for k in ("ep_gated", "ep_broken"):
        _base._REGISTRY.pop(k, None)


def test_entry_point_kinds_are_found_on_first_lookup_and_broken_ones_say_why(fake_entry_points):
    assert tp.lookup("tucker") is tp.Tucker and fake_entry_points == []  # known names never scan
    assert {"ep_gated", "ep_broken"} <= set(tp.kinds())  # listed without importing
    assert "ep_gated" not in _base._REGISTRY
    assert tp.lookup("EP_GATED") is GatedLoRA
    assert tp.parametrization("ep_gated", (4, 4), rank=2) == GatedLoRA((4, 4), 2)
    with pytest.raises(TuckerPeftError, match=r"kind 'ep_broken': entry point 'tucker_peft_no_such_module:Kind' "
                                              r"\(group 'tucker_peft.kinds'\) failed to load: ModuleNotFoundError"):
        tp.lookup("ep_broken")
    assert fake_entry_points == [_base.ENTRY_POINT_GROUP]  # scanned once


def test_module_colon_class_names_a_kind():
    assert tp.lookup(f"{__name__}:GatedLoRA") is GatedLoRA
    with pytest.raises(TuckerPeftError, match="could not be imported"):
        tp.lookup("tucker_peft_no_such_module:Kind")
    with pytest.raises(TuckerPeftError, match="expected a Parametrization subclass"):
        tp.lookup("math:pi")


def test_importing_reads_no_entry_points_and_no_tensorly():
    code = ("import importlib.metadata as m\n"
            "def boom(*a, **k): raise AssertionError('entry points read at import')\n"
            "m.entry_points = boom\n"
            "import sys, numpy as np, tucker_peft as tp\n"
            "spec = tp.parametrization('cp', (5, 4, 3), rank=2)\n"
            "spec.init('parafac', tensor=np.random.default_rng(0).standard_normal((5, 4, 3)))\n"
            "assert 'tensorly' not in sys.modules, 'CP init imported tensorly'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cp_init_leaves_another_threads_tensorly_backend_alone():
    # tensorly's set_backend/backend_context change the process-wide default that every thread without
    # its own setting reads: the old tensorly-based init flipped a watching thread to 'numpy' (measured).
    tl = pytest.importorskip("tensorly")
    pytest.importorskip("torch")
    t = np.random.default_rng(0).standard_normal((8, 7, 6))
    done = threading.Event()
    seen: list[str] = []

    def watch():  # never sets a backend itself: reads the process default, 'pytorch'
        while not done.is_set():
            seen.append(tl.get_backend())
        seen.append(tl.get_backend())

    tl.set_backend("pytorch")
    th = threading.Thread(target=watch)
    th.start()
    try:
        for seed in range(5):
            tp.CP(t.shape, 4).init("parafac", tensor=t, seed=seed)
        assert tl.get_backend() == "pytorch"
    finally:
        done.set()
        th.join()
        tl.set_backend("numpy")
    assert seen and set(seen) == {"pytorch"}


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_parafac_rejects_non_finite_input_at_once(bad):
    t = np.ones((4, 3, 2))
    t[1, 2, 0] = bad
    with pytest.raises(TuckerPeftError, match="NaN or Inf"):
        tp.parafac(t, 2)


def test_parafac_fits_on_the_tensors_library():
    torch = pytest.importorskip("torch")
    spec = tp.CP((6, 5, 4), 2)
    t = spec.reconstruct(spec.init("random", seed=3))
    w, fs = tp.parafac(torch.tensor(t, dtype=torch.float32), 2, n_iter=300, tol=1e-12)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    p = {"weights": w.double().numpy(), **{f"factor_{n}": f.double().numpy() for n, f in enumerate(fs)}}
    assert np.linalg.norm(spec.reconstruct(p) - t) / np.linalg.norm(t) < 1e-4


# -- one clear error per bad input of the new kinds -----------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: tp.TT((6, 4, 3), (2, 2, 2)), r"expected 2 bond ranks \(cores \(6, 4, 3\)\), got 3"),
    (lambda: tp.TT((6, 4, 3), (7, 2)), r"ranks\[0\] \(bond between cores of sizes 6 and 4\): expected an int in \[1, 6\]"),
    (lambda: tp.TT((2, 2, 16), (1, 4)), r"ranks\[1\]=4: expected at most r_\{k-1\}·m_k = 2 and m_\{k\+1\}·r_\{k\+1\} = 16"),
    (lambda: tp.TT((6, 4), 0), r"ranks: expected an int in \[1"),
    (lambda: tp.TT((6, 4), "2"), r"ranks: expected an int or 1 bond ranks"),
    (lambda: tp.TT((6, 4), 2, tensorize={0: (4, 2)}), r"tensorize\[0\]: factors \(4, 2\) multiply to 8, expected mode 0's size 6"),
    (lambda: tp.TT((6, 4), 2, tensorize={2: (2, 2)}), r"tensorize: expected mode indices in \[0, 2\)"),
    (lambda: tp.TT((6, 4), 2, tensorize="balanced"), r"tensorize: expected None, 'auto'"),
    (lambda: tp.TT((6, 4), 2, tensorize={0: ()}), r"tensorize\[0\]: expected a non-empty tuple of ints"),
    (lambda: tp.LoKr((8,), 2), r"LoKr needs a weight \(out, in, \*kernel\) of at least 2 modes, got \(8,\)"),
    (lambda: tp.LoKr((8, 8), 0), r"rank \(LoKr of shape \(8, 8\)\): expected an int in \[1"),
    (lambda: tp.LoKr((8, 8), 2, factor=0), r"factor: expected -1 or an int >= 1, got 0"),
    (lambda: tp.LoKr((8, 8), 2, decompose_both="yes"), r"decompose_both: expected a bool"),
    (lambda: tp.LoHa((6, 4), 5), r"rank \(LoHa of shape \(6, 4\)\): expected an int in \[1, 4\], got 5"),
    (lambda: tp.LoHa((6, 0), 1), r"shape\[1\]"),
])
def test_new_kinds_reject_bad_input_with_one_clear_error(make, match):
    with pytest.raises(TuckerPeftError, match=match):
        make()


def test_tensorize_auto_balances_factors_and_makes_a_long_train():
    spec = tp.TT((768, 768), 4, tensorize="auto")
    assert spec.cores == (8, 8, 12, 8, 8, 12)
    assert spec.ranks == (4, 4, 4, 4, 4) and spec.describe_ranks() == "4,4,4,4,4 on 8x8x12x8x8x12"
    assert tp.TT((768, 768), 4, tensorize={0: (8, 12, 8), 1: (8, 12, 8)}).cores == (8, 12, 8, 8, 12, 8)
    assert tp.TT((7, 5), 3, tensorize="auto").tensorize is None  # primes stay whole


def test_ttsvd_never_decomposes_the_wide_unfolding():
    # A (4, 20000) weight: TT-SVD's first unfolding is 4 x 20000; the Gram trick keeps it a 4 x 4 eigenproblem.
    t = np.random.default_rng(0).standard_normal((4, 20000))
    spec = tp.TT(t.shape, 4)
    p = spec.init("ttsvd", tensor=t)
    np.testing.assert_allclose(spec.reconstruct(p), t, atol=1e-9)


def test_lokr_matches_peft_factorization_and_param_names():
    peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")
    from tucker_peft.lokr import factorization

    for d in range(1, 200):
        for f in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(d, f) == peft_lokr.factorization(d, f)
    assert set(tp.LoKr((64, 48), 2).param_shapes) == {"w1", "w2_a", "w2_b"}
    assert set(tp.LoKr((64, 48), 2, decompose_both=True).param_shapes) == {"w1_a", "w1_b", "w2_a", "w2_b"}
    assert set(tp.LoKr((64, 48, 3, 3), 8).param_shapes) == {"w1", "w2"}


def test_lokr_equals_peft_delta_weight():
    pytest.importorskip("torch")
    from peft import LoKrConfig, get_peft_model
    from torch import nn

    for layer, shape, r in [(nn.Linear(48, 64), (64, 48), 2), (nn.Conv2d(12, 16, 3), (16, 12, 3, 3), 1)]:
        model = get_peft_model(nn.Sequential(layer), LoKrConfig(r=r, alpha=r, target_modules=["0"],
                                                                init_weights=False))
        lk = model.base_model.model[0]
        spec = tp.LoKr(shape, r)
        params = {k: getattr(lk, f"lokr_{k}")["default"].detach().double().numpy() for k in spec.param_shapes}
        want = lk.get_delta_weight("default").detach().double().numpy()
        np.testing.assert_allclose(spec.reconstruct(params), want, rtol=1e-6, atol=1e-7)


def test_loha_equals_peft_delta_weight():
    pytest.importorskip("torch")
    from peft import LoHaConfig, get_peft_model
    from torch import nn

    for layer, shape in [(nn.Linear(10, 7), (7, 10)), (nn.Conv2d(5, 6, 3), (6, 5, 3, 3))]:
        model = get_peft_model(nn.Sequential(layer), LoHaConfig(r=2, alpha=2, target_modules=["0"],
                                                                init_weights=False))
        lh = model.base_model.model[0]
        spec = tp.LoHa(shape, 2)
        params = {k: getattr(lh, f"hada_{k}")["default"].detach().double().numpy() for k in spec.param_shapes}
        want = lh.get_delta_weight("default").detach().double().numpy()
        np.testing.assert_allclose(spec.reconstruct(params), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", [tp.TT((8, 6, 3), 3), tp.LoKr((8, 6, 3), 1), tp.LoHa((8, 6, 3), 2)],
                         ids=lambda s: s.kind)
def test_fit_starts_new_kinds_from_their_principal_init(spec):
    t = np.random.default_rng(0).standard_normal(spec.shape)
    res = tp.fit(spec, t, steps=30, method="adam", lr=1e-2)
    start = spec.init(spec.principal_init, tensor=t, seed=0)
    assert res.init_error == pytest.approx(np.linalg.norm(spec.reconstruct(start) - t) / np.linalg.norm(t), rel=1e-9)
    assert res.final_error <= res.init_error * 1.01  # Adam only refines (TT-SVD is already quasi-optimal)


@given(shape=tpst.shapes(min_ndim=2, max_ndim=4, max_side=5, max_size=300), r=st.integers(1, 6),
       seed=st.integers(0, 50))
def test_tt_zero_init_has_orthonormal_cores_so_a_sign_step_moves_dw_by_root_n0(shape, r, seed):
    spec = tp.TT(shape, r)
    p = spec.init("zero", seed=seed)
    last = f"core_{len(spec.cores) - 1}"
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=p[last].shape)
    dw = spec.reconstruct({**p, last: signs})
    assert np.linalg.norm(dw) == pytest.approx(math.sqrt(spec.zero_block_size), rel=1e-9)
    out, k = shape[0], math.prod(shape[1:])
    assert spec.matched_scale() == pytest.approx(math.sqrt(out * spec.num_params / (out + k) / 3)
                                                 / math.sqrt(spec.zero_block_size))


@pytest.mark.parametrize("spec", [tp.Tucker((8, 6, 3, 3), (4, 3, 2, None)), tp.Tucker2((8, 6, 3), 3),
                                  tp.CP((8, 6, 3), 5), tp.TT((8, 6, 3), 3)], ids=lambda s: s.kind)
def test_orthonormal_zero_init_makes_a_sign_step_move_dw_by_root_n0(spec):
    # What scale_rule='matched' assumes: each zero-block entry moves ΔW by a unit-norm, mutually orthogonal
    # direction (Tucker, TT), or unit-norm (CP, whose rank-one terms are only nearly orthogonal).
    p = spec.init("zero", seed=0, orthonormal=True)
    assert not np.any(spec.reconstruct(p))
    zero = next(k for k, v in p.items() if not np.any(v))
    rng = np.random.default_rng(1)
    for j in range(min(5, p[zero].size)):
        e = np.zeros(p[zero].size)
        e[j] = 1.0
        assert np.linalg.norm(spec.reconstruct({**p, zero: e.reshape(p[zero].shape)})) == pytest.approx(1.0)
    if spec.kind != "cp":
        signs = rng.choice([-1.0, 1.0], size=p[zero].shape)
        assert np.linalg.norm(spec.reconstruct({**p, zero: signs})) == pytest.approx(math.sqrt(spec.zero_block_size))
    with pytest.raises(tp.InitError, match="unexpected options.*orthonormal"):
        tp.LoRA((8, 6), 2).init("zero", orthonormal=True)


def test_fit_als_asks_the_kind_for_its_solver(gated):
    t = np.random.default_rng(0).standard_normal((6, 4))
    with pytest.raises(TuckerPeftError, match="kind 'gated_lora_test' has no alternating least squares.*adam"):
        tp.fit(GatedLoRA((6, 4), 2), t, steps=2, init="random")
    with pytest.raises(TuckerPeftError, match="kind 'tt' has no alternating least squares"):
        tp.fit(tp.TT((6, 4, 3), 2), np.ones((6, 4, 3)), steps=2)
    sweeps = []

    class GatedALS(GatedLoRA):
        def als_solver(self, target, scale, params):
            class Solver:  # one sweep: B by least squares with g and A fixed
                def sweep(self_inner):
                    ga = params["g"][:, None] * params["A"]
                    b = np.linalg.lstsq(ga.T, (target / scale).T, rcond=None)[0].T
                    sweeps.append(b)
                    return {**params, "B": b}
            return Solver()

    res = tp.fit(GatedALS((6, 4), 2), t, steps=3, init="random", scale=2.0)
    assert len(sweeps) == 3 and res.params["B"] is sweeps[-1]
    assert res.final_error < res.init_error


# -- sample_spec, min_modes: the property strategies ask each kind for its ranks ---------------------

BUILT_IN = ("tucker", "tucker2", "cp", "lora", "tt", "lokr", "loha")


def _rng_pick(rng):
    return lambda options: options[int(rng.integers(len(options)))]


def _samples(kind, shape, n=80, seed=0):
    rng = np.random.default_rng(seed)
    out = [tp.lookup(kind).sample_spec(shape, _rng_pick(rng)) for _ in range(n)]
    for s in out:
        assert type(s) is tp.lookup(kind) and s.shape == shape
        assert s.reconstruct(s.init("random", seed=0)).shape == shape  # the constructor validated it; it builds
    return out


@pytest.mark.parametrize("shape", [(4, 6), (6, 4, 3), (4, 2, 2, 3)])
def test_sample_spec_of_each_built_in_kind_covers_its_ranks_and_options(shape):
    out, k = shape[0], math.prod(shape[1:])
    tucker = _samples("tucker", shape)
    for n, d in enumerate(shape):  # every mode: None and each rank 1..I_n
        assert {s.ranks[n] for s in tucker} == {None, *range(1, d + 1)}
    tucker2 = _samples("tucker2", shape)
    assert {s.ranks[0] for s in tucker2} == set(range(1, out + 1)) and all(s.ranks[2:] == (None,) * (len(shape) - 2)
                                                                          for s in tucker2)
    cp = _samples("cp", shape)
    assert {s.rank for s in cp} == set(range(1, min(math.prod(shape) // max(shape), 6) + 1))
    for kind in ("lora", "loha"):
        assert {s.rank for s in _samples(kind, shape)} == set(range(1, min(out, k, 6) + 1))
    assert {s.effective for s in _samples("loha", shape)} == ({False, True} if k > shape[1] else {False})
    tt = _samples("tt", shape, n=200)
    assert {s.tensorize is None for s in tt} == {True, False}  # whole modes and split ones
    assert any(len(set(s.ranks)) > 1 for s in tt)  # per-bond ranks, not only a broadcast int
    assert max(max(s.ranks) for s in tt) <= 6
    lokr = _samples("lokr", (16, 12, *shape[2:]), n=160)  # blocks large enough for a low-rank W2
    assert {(s.factor, s.decompose_both, s.full_w2) for s in lokr} >= {(f, b, w) for f in (-1, 2)
                                                                      for b in (False, True) for w in (False, True)}
    assert {s.effective for s in lokr} == ({False, True} if k > shape[1] else {False})


def test_sample_spec_defaults_to_the_budget_family(gated):
    family, t_max = GatedLoRA.budget_family((6, 4))
    assert GatedLoRA.sample_spec((6, 4), lambda o: o[0]) == family(1)
    assert GatedLoRA.sample_spec((6, 4), lambda o: o[-1]) == family(t_max) == GatedLoRA((6, 4), 4)
    seen = {GatedLoRA.sample_spec((6, 4), _rng_pick(np.random.default_rng(s))).rank for s in range(40)}
    assert seen == {1, 2, 3, 4}


@given(data=st.data())
def test_specs_pads_drawn_shapes_to_the_kinds_min_modes_and_keeps_given_ones(data):
    spec = data.draw(tpst.specs(kinds=["lokr"], shape_strategy=tpst.shapes(min_ndim=1, max_ndim=1)))
    assert tp.LoKr.min_modes == 2 and len(spec.shape) == 2 and spec.shape[1] == 2
    spec = data.draw(tpst.specs(kinds=["lokr", "lora"], shape=(5,)))  # LoKr cannot take (5,): never drawn
    assert spec.kind == "lora" and spec.shape == (5,)


@settings(max_examples=1)
@given(data=st.data())
def test_specs_refuses_a_shape_no_kind_takes(data):
    with pytest.raises(TuckerPeftError, match=r"none of the kinds \['lokr'\] takes a shape of 1 modes"):
        data.draw(tpst.specs(kinds=["lokr"], shape=(5,)))


# -- for_energy: the energy rule per kind -------------------------------------------------------------

def _energy_rank(t, n, e):
    """Independent reference: the smallest r whose leading σ² of the mode-n unfolding keep a fraction e."""
    s2 = np.linalg.svd(np.moveaxis(t, n, 0).reshape(t.shape[n], -1), compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(s2) / s2.sum() >= e - 1e-12)) + 1


def _tucker_tensor(shape, ranks, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(ranks)
    for n, (d, r) in enumerate(zip(shape, ranks)):
        q, _ = np.linalg.qr(rng.standard_normal((d, r)))
        t = np.moveaxis(np.tensordot(q, t, axes=(1, n)), 0, n)
    return t


@pytest.mark.parametrize("kind", BUILT_IN)
def test_for_energy_reads_the_modes_the_kind_takes_its_ranks_from(kind):
    from tucker_peft.cli._ranks import energy_spec

    shape, true = (6, 5, 3, 4), (2, 3, 1, 2)
    t = _tucker_tensor(shape, true)
    e = 0.99999
    asked = []

    def rank_of(n, frac):
        asked.append(n)
        return _energy_rank(t, n, frac)

    cls = tp.lookup(kind)
    spec = cls.for_energy(shape, [e] * 4, rank_of)
    if kind == "tucker":
        want, modes = tp.Tucker(shape, true), [0, 1, 2, 3]
        assert cls.for_energy(shape, [e, None, e, e], rank_of) == tp.Tucker(shape, (2, None, 1, 2))
    elif kind == "tucker2":
        want, modes = tp.Tucker2(shape, true[:2]), [0, 1]
        assert cls.for_energy(shape, [None, e, e, e], rank_of) == tp.Tucker2(shape, (None, 3))
    else:  # one rank from the mode-0 unfolding, clipped like any rank
        want, modes = cls.for_ranks(shape, true[0]), [0]
        with pytest.raises(RankError, match="takes its rank from the energy of mode 0, got 'none' there"):
            cls.for_energy(shape, [None, e, e, e], rank_of)
    assert spec == want and asked[: len(modes)] == modes and set(asked) <= set(modes)
    # the CLI's rule: the same spec through ranks.by_energy on the tensor
    assert energy_spec(kind, shape, (e,), t) == want


def test_for_energy_defaults_to_the_mode_0_rank_for_a_kind_from_outside(gated):
    t = _tucker_tensor((6, 5, 4), (3, 2, 2))
    assert GatedLoRA.for_energy((6, 5, 4), [0.99999, None, None], lambda n, e: _energy_rank(t, n, e)) == \
        GatedLoRA((6, 5, 4), 3)


# -- no code outside a kind's own file branches on which kind it is -----------------------------------

#: The compare harness measures every kind against LoRA at the same budget: "lora" there names the baseline
#: of the comparison (a research choice), not kind behaviour.
BASELINE_LITERALS = {"compare/stats.py": {"lora"}, "compare/runner.py": {"lora"}}


def _kind_branches(path, source, names, classes):
    """``(line, text)`` of each comparison with a built-in kind's name, isinstance/issubclass/type-is on a kind
    class, match case on a kind name, or dispatch dict keyed by kind names, in ``source``."""
    import ast

    def kind_literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            return {node.value}  # case-sensitive: kind names are lower case; 'LORA' is PEFT's peft_type
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*map(kind_literals, node.elts))
        return set()

    def kind_class(node):
        if isinstance(node, ast.Tuple):
            return any(kind_class(e) for e in node.elts)
        return (isinstance(node, ast.Name) and node.id in classes) or \
            (isinstance(node, ast.Attribute) and node.attr in classes)

    allowed = BASELINE_LITERALS.get(path, set())
    tree = ast.parse(source)
    # module constants holding kind names (e.g. a tuple of "per-mode" kinds) count as the names themselves
    consts = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None
              and kind_literals(n.value)
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    out = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Compare):
            ops = [node.left, *node.comparators]
            lits = set().union(*map(kind_literals, ops))
            hit = bool(lits - allowed) or any(kind_class(o) for o in ops) or \
                any(isinstance(o, ast.Name) and o.id in consts for o in ops)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
            hit = kind_class(node.args[1])
        elif isinstance(node, ast.MatchValue):
            hit = bool(kind_literals(node.value))
        elif isinstance(node, ast.Dict):
            hit = sum(bool(kind_literals(k)) for k in node.keys if k is not None) >= 2
        if hit:
            out.append((node.lineno, ast.get_source_segment(source, node)))
    return out


def test_no_code_outside_a_kinds_own_file_branches_on_which_kind_it_is():
    import inspect
    from pathlib import Path

    builtin = {k: tp.lookup(k) for k in ("tucker", "tucker2", "cp", "lora", "tt", "lokr", "loha")}
    kind_files = {Path(inspect.getsourcefile(c)).resolve() for c in builtin.values()}
    root = Path(tp.__file__).resolve().parent
    names, classes = set(builtin), {c.__name__ for c in builtin.values()}
    found = []
    for f in sorted(root.rglob("*.py")):
        if f.resolve() in kind_files:
            continue
        rel = f.relative_to(root).as_posix()
        found += [f"{rel}:{line}: {text}" for line, text in _kind_branches(rel, f.read_text(), names, classes)]
    assert not found, "kind-specific branches outside the kind files (move them behind a contract member):\n" + \
        "\n".join(found)


def test_the_branch_scanner_finds_what_it_looks_for():
    src = '''
if kind == "tucker": pass
if spec.kind in ("lora", "cp"): pass
if isinstance(spec, (Tucker, tp.LoKr)): pass
if type(spec) is TT: pass
match kind:
    case "loha": pass
f = {"tucker": 1, "cp": 2}[kind]
if kind != "lora": pass
ok = kind == "other" or isinstance(spec, Parametrization)
PER_MODE = ("tucker", "tucker2")
if kind not in PER_MODE: pass
'''
    names, classes = {"tucker", "cp", "lora", "loha"}, {"Tucker", "LoKr", "TT"}
    lines = [line for line, _ in _kind_branches("x.py", src, names, classes)]
    assert sorted(lines) == [2, 3, 4, 5, 7, 8, 9, 12]
    # in a listed compare file only the baseline "lora" alone is let through
    assert sorted(line for line, _ in _kind_branches("compare/stats.py", src, names, classes)) == [2, 3, 4, 5, 7, 8, 12]


# -- effective_conv (PEFT's use_effective_conv2d) for LoHa and LoKr ----------------------------------

@pytest.mark.parametrize("spec", [tp.LoHa((8, 6, 3, 3), 2, True), tp.LoHa((8, 5, 3), 3, True),
                                  tp.LoKr((16, 12, 3, 3), 1, effective_conv=True),
                                  tp.LoKr((36, 36, 3, 2), 2, decompose_both=True, effective_conv=True)],
                         ids=["loha-conv2d", "loha-conv1d", "lokr-conv2d", "lokr-both"])
def test_effective_conv_principal_init_is_exact_on_a_tensor_of_its_form(spec):
    """init('hosvd') gives back a tensor of the form it fits exactly: for LoHa a Tucker-2 of ranks (r, r) (its
    first half, the second all ones), for LoKr any s·ΔW (kron of W1 and a Tucker-2 W2); and ΔW = 0 at
    init('zero') with the zero block where PEFT puts it."""
    assert spec.effective and "t2" in spec.param_shapes
    if spec.kind == "loha":
        t2 = tp.Tucker2(spec.shape, spec.rank)
        w = np.asarray(t2.reconstruct(t2.init("random", seed=3)))
    else:
        w = 1.7 * np.asarray(spec.reconstruct(spec.init("random", seed=3)))
    got = 1.7 * np.asarray(spec.reconstruct(spec.init("hosvd", tensor=w, scale=1.7)))
    np.testing.assert_allclose(got, w, rtol=1e-9, atol=1e-12)
    zero = spec.init("zero", seed=0)
    assert not np.any(spec.reconstruct(zero))
    assert spec.zero_block_size == sum(v.size for v in zero.values() if not np.any(v))


def test_effective_conv_is_ignored_where_peft_ignores_it():
    for spec in (tp.LoHa((8, 6), 2, True), tp.LoHa((8, 6, 1, 1), 2, True), tp.LoKr((16, 12, 1, 1), 1, effective_conv=True),
                 tp.LoKr((16, 12, 3, 3), 2, effective_conv=True)):  # the last: W2 full at r >= max(b, d)/2
        plain = dataclasses.replace(spec, effective_conv=False)
        assert not spec.effective and spec.param_shapes == plain.param_shapes and spec.num_params == plain.num_params
    with pytest.raises(TuckerPeftError, match="effective_conv: expected a bool"):
        tp.LoHa((8, 6, 3), 2, "yes")
