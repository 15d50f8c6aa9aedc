"""Cross-layer stacks in the core: ``member(lead)`` / ``slice(params, index)`` of every kind, and ``matched_scale(lead)``.

References are independent of the slicing code: the full reconstruction of the stack indexed at the member,
torch autograd through it, the stack's own analytic vjp with the member's cotangent embedded, and (for the matched
scale) a sign step measured on real arrays against PEFT's LoRA init on every member.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import testing as tpst
from tucker_peft._slice import TermSlice

from .conftest import to_np

KINDS = tpst.KINDS  # the seven built-in kinds
#: Kinds whose members are again of their own form (a Tucker-2 stack's member is a Tucker).
OWN = {"tucker": tp.Tucker, "tucker2": tp.Tucker, "cp": tp.CP, "tt": tp.TT}
stack_shapes = tpst.shapes(min_ndim=2, max_ndim=4, max_side=3, max_size=120)


@st.composite
def stacks(draw, kinds=KINDS):
    """``(spec, params, lead)``: a small stacked spec, random params, and how many leading modes index members."""
    spec = draw(tpst.specs(kinds, shape_strategy=stack_shapes))
    return spec, draw(tpst.params(spec)), draw(st.integers(1, spec.ndim - 1))


def indices(spec, lead):
    return list(itertools.product(*map(range, spec.shape[:lead])))


def embedded(spec, index, ct):
    """The stack's cotangent that is ``ct`` at the member ``index`` and zero elsewhere."""
    full = np.zeros(spec.shape)
    full[index] = ct
    return full


# -- values -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), scale=st.floats(-2, 2))
def test_every_member_slice_reconstructs_the_slice_of_the_full_stack(kind, data, scale):
    spec, params, lead = data.draw(stacks([kind]))
    member = spec.member(lead)
    assert member.shape == spec.shape[lead:] and member is spec.member(lead)  # built once per spec
    full = spec.reconstruct(params, scale)
    for index in indices(spec, lead):
        sl = spec.slice(params, index)
        assert {k: tuple(v.shape) for k, v in sl.items()} == member.param_shapes
        np.testing.assert_allclose(member.reconstruct(sl, scale), full[index], rtol=1e-10, atol=1e-12)


@settings(max_examples=15)
@given(data=st.data(), dtype=st.sampled_from(["float32", "float64"]))
def test_slices_stay_in_the_params_library_and_dtype(xp, data, dtype):
    spec, params, lead = data.draw(stacks())
    conv = {k: xp.asarray(v, dtype=getattr(xp, dtype)) for k, v in params.items()}
    member = spec.member(lead)
    full = spec.reconstruct(params, 0.7)
    tol = 1e-4 if dtype == "float32" else 1e-11
    for index in indices(spec, lead)[:6]:
        sl = spec.slice(conv, index)
        assert all(type(v) is type(conv[next(iter(conv))]) and v.dtype == getattr(xp, dtype) for v in sl.values())
        np.testing.assert_allclose(to_np(member.reconstruct(sl, 0.7)), full[index], rtol=tol, atol=tol)


def test_lead_zero_and_an_int_index():
    spec = tp.Tucker((3, 4, 5), (2, 3, 2))
    p = spec.init("random", seed=0)
    assert spec.member(0) is spec and spec.slice(p, ()) == p
    np.testing.assert_allclose(spec.member(1).reconstruct(spec.slice(p, 2)), spec.reconstruct(p)[2], atol=1e-12)


# -- gradients ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20)
@given(data=st.data(), scale=st.floats(-2, 2).filter(lambda s: s != 0))
def test_member_gradients_equal_autograd_through_the_full_stack_and_the_vjps(kind, data, scale):
    torch = pytest.importorskip("torch")
    spec, params, lead = data.draw(stacks([kind]))
    member = spec.member(lead)
    index = data.draw(st.sampled_from(indices(spec, lead)))
    ct = data.draw(tpst.arrays_for(member.shape))
    tp_ = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    names = list(tp_)
    sl = spec.slice(tp_, index)
    out = member.reconstruct(sl, scale)
    got = torch.autograd.grad((out * torch.tensor(ct)).sum(), [tp_[k] for k in names] + list(sl.values()),
                              allow_unused=True)
    want = torch.autograd.grad((spec.reconstruct(tp_, scale)[index] * torch.tensor(ct)).sum(),
                               [tp_[k] for k in names], allow_unused=True)
    analytic = spec.vjp(params, embedded(spec, index, ct), scale)  # the stack's own vjp, no autograd
    for k, g, w in zip(names, got, want):
        g = np.zeros(params[k].shape) if g is None else g.numpy()
        w = np.zeros(params[k].shape) if w is None else w.numpy()
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(g, analytic[k], rtol=1e-9, atol=1e-11)
    # the member's vjp is autograd's gradient for its (sliced) params
    mv = member.vjp({k: v.detach().numpy() for k, v in sl.items()}, ct, scale)
    for k, g in zip(sl, got[len(names):]):
        np.testing.assert_allclose(mv[k], np.zeros(mv[k].shape) if g is None else g.numpy(), rtol=1e-9, atol=1e-11)


# -- own-kind members -----------------------------------------------------------------------------------------------
def _lora_exact(member, sl, scale):
    b, a = (to_np(x) for x in member.lora_factors(sl, scale))
    np.testing.assert_allclose(b @ a, to_np(member.reconstruct(sl, scale)).reshape(member.shape[0], -1),
                               rtol=1e-10, atol=1e-12)
    return b.shape[1]


@pytest.mark.parametrize("kind", sorted(OWN))
@given(data=st.data())
def test_tucker_cp_tt_members_keep_their_form_factored_and_exact_lora(kind, data):
    spec, params, lead = data.draw(stacks([kind]))
    member = spec.member(lead)
    if not isinstance(member, OWN[kind]):  # only where the trailing ranks do not fit the member (CP, TT)
        assert kind in ("cp", "tt") and isinstance(member, TermSlice)
        return
    assert type(member) is OWN[kind] and member.kind == OWN[kind].kind
    sl = spec.slice(params, data.draw(st.sampled_from(indices(spec, lead))))
    if member.ndim >= 2:
        assert member.factored(sl, 0.5) is not None
        _lora_exact(member, sl, 0.5)


@pytest.mark.parametrize("spec, lead, member, rank", [
    (tp.Tucker((12, 4, 16, 10), (4, 3, 5, 6)), 2, tp.Tucker((16, 10), (5, 6)), 5),
    (tp.Tucker((3, 4, 6, 5), (None, 3, None, 2)), 1, tp.Tucker((4, 6, 5), (3, None, 2)), 3),
    (tp.Tucker2((4, 3, 8, 6), 2), 2, tp.Tucker((8, 6), (None, None)), 8),  # a dense member: Tucker-2 stacks
    (tp.Tucker2((4, 8, 6), (2, 3)), 1, tp.Tucker((8, 6), (3, None)), 3),  # factor the leading modes only
    (tp.CP((12, 4, 16, 10), 6), 2, tp.CP((16, 10), 6), 6),
    (tp.TT((12, 4, 16, 10), 3), 2, tp.TT((16, 10), (3,)), 3),
    (tp.TT((6, 4, 8), 3, tensorize={0: (2, 3), 2: (2, 4)}), 1, tp.TT((4, 8), (3, 3), tensorize={1: (2, 4)}), 3),
], ids=["tucker", "tucker-none", "tucker2", "tucker2-lead1", "cp", "tt", "tt-split"])
def test_members_of_stacks_are_of_the_kind_with_their_low_rank_export(spec, lead, member, rank):
    p = spec.init("random", seed=1)
    got = spec.member(lead)
    assert got == member and type(got) is type(member)
    for index in indices(spec, lead)[::7]:
        sl = spec.slice(p, index)
        np.testing.assert_allclose(got.reconstruct(sl, 2.0), spec.reconstruct(p, 2.0)[index], atol=1e-11)
        assert _lora_exact(got, sl, 2.0) == rank  # the member's own rank, not a dense slice with an identity


@pytest.mark.parametrize("spec, lead", [
    (tp.CP((3, 4, 5), 7), 1),  # R = 7 > the (4, 5) member's largest CP rank 4
    (tp.CP((3, 4, 5), 2), 2),  # a one-mode member is a CP only at rank 1
    (tp.TT((6, 4, 8), 3, tensorize={0: (2, 3), 2: (2, 4)}), 2),  # bond 3 > what the (2, 4) train allows
    (tp.LoRA((3, 4, 5), 2), 1), (tp.LoHa((3, 4, 5), 2), 1), (tp.LoKr((6, 4, 5), 1), 1),
], ids=["cp-rank", "cp-one-mode", "tt-bond", "lora", "loha", "lokr"])
def test_other_members_are_the_generic_slice_with_an_exact_dense_export(spec, lead):
    p = spec.init("random", seed=2)
    member = spec.member(lead)
    assert isinstance(member, TermSlice) and member.factored(spec.slice(p, (0,) * lead)) is None
    for index in indices(spec, lead):
        sl = spec.slice(p, index)
        np.testing.assert_allclose(member.reconstruct(sl, 0.5), spec.reconstruct(p, 0.5)[index], atol=1e-12)
        if member.ndim >= 2:
            _lora_exact(member, sl, 0.5)


# -- zero init, errors ----------------------------------------------------------------------------------------------
@given(data=st.data(), seed=st.integers(0, 2**31))
def test_zero_init_gives_zero_slices(xp, data, seed):
    spec = data.draw(tpst.specs(shape_strategy=stack_shapes))
    lead = data.draw(st.integers(1, spec.ndim - 1))
    p = spec.init("zero", like=xp.zeros(1, dtype=xp.float64), seed=seed)
    member = spec.member(lead)
    for index in indices(spec, lead)[:4]:
        assert not np.any(to_np(member.reconstruct(spec.slice(p, index), 3.0)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("index, match", [
    ((0, 0, 0), r"index: expected a tuple of fewer than 3 ints \(one per leading mode of shape \(4, 6, 5\)\)"),
    ((4,), r"index\[0\] \(mode of size 4\): expected an int in \[0, 3\], got 4"),
    ((-1,), r"index\[0\] \(mode of size 4\): expected an int in \[0, 3\], got -1"),
    ((1, 6), r"index\[1\] \(mode of size 6\): expected an int in \[0, 5\], got 6"),
    ((True,), r"index\[0\].*got True"), ((1.0,), r"index\[0\].*got 1.0"),
    ("0", "index: expected a tuple"), (None, "index: expected a tuple"),
])
def test_bad_index_or_lead_gets_one_clear_error(kind, index, match):
    spec = _spec(kind)
    p = spec.init("random", seed=0)
    with pytest.raises(tp.TuckerPeftError, match=match):
        spec.slice(p, index)


def _spec(kind):
    return {"tucker": tp.Tucker((4, 6, 5), 2), "tucker2": tp.Tucker2((4, 6, 5), 2), "cp": tp.CP((4, 6, 5), 3),
            "lora": tp.LoRA((4, 6, 5), 2), "tt": tp.TT((4, 6, 5), 2), "lokr": tp.LoKr((4, 6, 5), 1),
            "loha": tp.LoHa((4, 6, 5), 2)}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_lead_and_params_get_one_clear_error(kind):
    spec = _spec(kind)
    for lead in (3, -1, 1.0, "1"):
        with pytest.raises(tp.TuckerPeftError, match=r"lead: expected an int in \[0, 2\]"):
            spec.member(lead)
    p = spec.init("random", seed=0)
    name = next(iter(p))
    with pytest.raises(tp.ParamsError, match="params"):
        spec.slice({k: v for k, v in p.items() if k != name}, (1,))
    with pytest.raises(tp.ParamsError, match=rf"params\['{name}'\]: expected shape"):
        spec.slice({**p, name: np.zeros((1, 1))}, (1,))


# -- matched scale --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [tp.Tucker((6, 4, 8, 3), (2, 2, 3, 2)), tp.CP((6, 4, 8, 3), 4),
                                  tp.TT((6, 4, 8, 3), 3)], ids=lambda s: s.kind)
def test_matched_scale_lead_zero_is_the_single_layer_value(spec):
    out, k = spec.shape[0], math.prod(spec.shape[1:])
    n0 = sum(int(np.sum(v == 0)) for v in spec.init("zero", seed=0).values())
    want = math.sqrt(out * (spec.num_params / (out + k)) / 3) / math.sqrt(n0)
    assert spec.matched_scale() == pytest.approx(want, rel=1e-12)
    assert spec.matched_scale(0) == spec.matched_scale()


@pytest.mark.parametrize("spec", [tp.Tucker((6, 4, 16, 12), (3, 2, 4, 4)), tp.TT((6, 4, 16, 12), 3)],
                         ids=lambda s: s.kind)
@pytest.mark.parametrize("lead", [1, 2])
def test_matched_scale_of_a_stack_equates_a_sign_step_with_loras_on_every_member(spec, lead):
    # Measured, not restated: a sign step of size 1 on the orthonormal zero init moves the stack's ΔW by ‖·‖;
    # PEFT's LoRA (B = 0, A Kaiming-uniform) on each member, at the budget's rank r_L, by √(Σ_members ‖S_m A_m‖²),
    # estimated here from real LoRA inits at rank 1 (E‖S A‖² is linear in the rank).
    p = spec.init("zero", seed=0, orthonormal=True)
    zero = next(k for k, v in p.items() if not np.any(v))
    rng = np.random.default_rng(0)
    step = np.linalg.norm(spec.reconstruct({**p, zero: rng.choice([-1.0, 1.0], size=p[zero].shape)}))
    m = math.prod(spec.shape[:lead])
    one = tp.LoRA(spec.shape[lead:], 1)
    r_lora = spec.num_params / (m * one.num_params)
    per_rank = np.mean([np.sum((rng.choice([-1.0, 1.0], size=(one.shape[0], 1))
                                @ one.init("zero", seed=s)["A"]) ** 2) for s in range(400)])
    want = math.sqrt(m * r_lora * per_rank) / step
    assert spec.matched_scale(lead) == pytest.approx(want, rel=0.08)
    with pytest.raises(tp.TuckerPeftError, match=r"lead: expected an int in \[0, 3\]"):
        spec.matched_scale(4)


# -- JAX (pattern of tests/test_kinds_jax.py: a few fixed shapes, float64, under jax.jit) ----------------------------
JAX_STACKS = [(tp.Tucker((3, 4, 6, 5), (2, 3, None, 2)), 2), (tp.Tucker2((3, 4, 5), 2), 1), (tp.CP((3, 4, 5), 3), 1),
              (tp.TT((3, 4, 6), 2), 1), (tp.LoRA((3, 4, 5), 2), 1), (tp.LoKr((6, 8, 3), 1), 1),
              (tp.LoHa((3, 4, 5), 2), 1)]


@pytest.fixture(scope="module")
def jax_x64():
    jax = pytest.importorskip("jax", reason="JAX is optional: pip install jax")
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("spec, lead", JAX_STACKS, ids=lambda s: getattr(s, "kind", str(s)))
def test_member_slices_on_jax_under_jit_match_numpy_and_jax_grad(jax_x64, spec, lead):
    jax, jnp = jax_x64, jax_x64.numpy
    p = spec.init("random", seed=0)
    jp = {k: jnp.asarray(v) for k, v in p.items()}
    index = tuple(d - 1 for d in spec.shape[:lead])
    member = spec.member(lead)
    ct = np.random.default_rng(1).standard_normal(member.shape)
    dw = jax.jit(lambda q: member.reconstruct(spec.slice(q, index), 0.7))(jp)
    assert isinstance(dw, jax.Array) and dw.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(dw), spec.reconstruct(p, 0.7)[index], rtol=1e-12, atol=1e-12)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(member.reconstruct(spec.slice(q, index), 0.7) * ct)))(jp)
    want = spec.vjp(p, embedded(spec, index, ct), 0.7)
    for k in p:
        np.testing.assert_allclose(np.asarray(grad[k]), want[k], rtol=1e-10, atol=1e-12)


# -- torch.compile ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, lead", [(tp.Tucker((3, 4, 6, 5), (2, None, 3, 2)), 2), (tp.CP((3, 4, 6, 5), 3), 1),
                                        (tp.TT((6, 4, 5), 3, tensorize={0: (2, 3)}), 1), (tp.LoRA((3, 4, 5), 2), 1)],
                         ids=lambda s: getattr(s, "kind", str(s)))
def test_member_slice_and_reconstruct_compile_to_one_graph_equal_to_eager(spec, lead):
    torch = pytest.importorskip("torch")
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    p = {k: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for k, s in spec.param_shapes.items()}
    index = tuple(d - 1 for d in spec.shape[:lead])
    spec.member(lead)  # built eagerly once, as a binding does when it wraps the members

    def f(q):
        m = spec.member(lead)
        sl = spec.slice(q, index)
        fac = m.factored(sl, 0.5)
        return m.reconstruct(sl, 0.5), (fac[1] if fac is not None else sl[next(iter(sl))])

    eager = f(p)
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(p)
    assert not counters["graph_break"]
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ge = torch.autograd.grad(eager[0].square().sum(), list(p.values()), allow_unused=True)
    gc = torch.autograd.grad(got[0].square().sum(), list(p.values()), allow_unused=True)
    for a, b in zip(gc, ge):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
