"""Property-based tests of every reconstruction, gradient and shape invariant.

References are independent of the code under test: explicit loops and
mode-by-mode products in NumPy, torch autograd, and finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import testing as tpst

from .conftest import to_np

small_shapes = tpst.shapes(min_ndim=1, max_ndim=5, max_side=4, max_size=300)


def dense_tucker(core, factors):
    """Mode-by-mode products, the textbook definition."""
    out = core
    for n, u in enumerate(factors):
        if u is not None:
            out = np.moveaxis(np.tensordot(u, out, axes=([1], [n])), 0, n)
    return out


def dense(spec, p):
    """ΔW from params with explicit, independent NumPy code."""
    p = {k: to_np(v).astype(np.float64) for k, v in p.items()}
    if isinstance(spec, tp.Tucker):
        return dense_tucker(p["core"], [p.get(f"factor_{n}") for n in range(spec.ndim)])
    if isinstance(spec, tp.CP):
        out = np.zeros(spec.shape)
        for k in range(spec.rank):
            term = np.array(p["weights"][k])
            for n in range(spec.ndim):
                term = np.multiply.outer(term, p[f"factor_{n}"][:, k])
            out += term
        return out
    if isinstance(spec, tp.TT):
        return dense_tt(spec, p)
    if isinstance(spec, tp.LoKr):
        return dense_lokr(spec, p)
    if isinstance(spec, tp.LoHa) and "t1" in p:  # PEFT's make_weight_cp: each half a Tucker-2 of the kernel
        h1, h2 = (np.einsum("ij...,ip,jq->pq...", p[f"t{h}"], p[f"w{h}_a"], p[f"w{h}_b"]) for h in (1, 2))
        return h1 * h2
    if isinstance(spec, tp.LoHa):
        return ((p["w1_a"] @ p["w1_b"]) * (p["w2_a"] @ p["w2_b"])).reshape(spec.shape)
    return (p["B"] @ p["A"]).reshape(spec.shape)


def dense_tt(spec, p):
    """Every entry as the product of one matrix slice per core, in the (split) C order."""
    cores = [p[f"core_{k}"] for k in range(len(p))]
    sizes = [g.shape[1] for g in cores]
    out = np.zeros(sizes)
    for idx in np.ndindex(*sizes):
        m = np.ones((1, 1))
        for g, i in zip(cores, idx):
            m = m @ g[:, i, :]
        out[idx] = m[0, 0]
    return out.reshape(spec.shape)


def dense_lokr(spec, p):
    """np.kron of W1 (padded to W2's ndim) and W2, as PEFT's make_kron."""
    w1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]
    b, d = w1.shape[0] and spec.shape[0] // w1.shape[0], spec.shape[1] // w1.shape[1]
    w2 = p["w2"] if "w2" in p else (p["w2_a"] @ p["w2_b"]).reshape(b, d, *spec.shape[2:]) if "t2" not in p else \
        np.einsum("ij...,ip,jr->pr...", p["t2"], p["w2_a"], p["w2_b"])  # PEFT's make_weight_cp
    return np.kron(w1.reshape(*w1.shape, *(1,) * (spec.ndim - 2)), w2)


def num_params_formula(spec):
    """Each kind's parameter count as written in its documentation."""
    shape = spec.shape
    if isinstance(spec, tp.Tucker):
        return math.prod(d if r is None else r for d, r in zip(shape, spec.ranks)) + sum(
            d * r for d, r in zip(shape, spec.ranks) if r is not None)
    if isinstance(spec, tp.CP):
        return spec.rank * (1 + sum(shape))
    k = math.prod(shape[1:])
    if isinstance(spec, tp.LoRA):
        return spec.rank * (shape[0] + k)
    if isinstance(spec, tp.LoHa) and spec.effective_conv and len(shape) >= 3 and k > shape[1]:
        return 2 * (spec.rank ** 2 * (k // shape[1]) + spec.rank * (shape[0] + shape[1]))
    if isinstance(spec, tp.LoHa):
        return 2 * spec.rank * (shape[0] + k)
    if isinstance(spec, tp.TT):
        b = (1, *spec.ranks, 1)
        return sum(b[i] * m * b[i + 1] for i, m in enumerate(spec.cores))
    if isinstance(spec, tp.LoKr):
        a, bb, c, d = spec.blocks
        r, kk = spec.rank, math.prod(shape[2:])
        w1 = r * (a + c) if spec.decompose_both and r < max(a, c) / 2 else a * c
        w2 = r * (bb + d * kk) if r < max(bb, d) / 2 else bb * d * kk
        if spec.effective_conv and r < max(bb, d) / 2 and kk > 1:
            w2 = r * r * kk + r * (bb + d)
        return w1 + w2
    raise AssertionError(spec)


@given(tpst.spec_and_params(shape_strategy=small_shapes), st.floats(-3, 3).filter(lambda s: s != 0))
def test_reconstruct_matches_independent_definition(case, scale):
    spec, params = case
    np.testing.assert_allclose(spec.reconstruct(params, scale), scale * dense(spec, params), rtol=1e-10, atol=1e-10)


@given(data=st.data(), dtype=st.sampled_from(["float32", "float64"]))
def test_reconstruct_keeps_shape_dtype_library(xp, data, dtype):
    spec = data.draw(tpst.specs(shape_strategy=small_shapes))
    params = data.draw(tpst.params(spec, xp, dtype))
    out = spec.reconstruct(params, 0.5)
    assert tuple(out.shape) == spec.shape
    assert out.dtype == getattr(xp, dtype)
    assert type(out) is type(params[next(iter(params))])
    np.testing.assert_allclose(to_np(out), 0.5 * dense(spec, params), rtol=1e-4 if dtype == "float32" else 1e-10,
                               atol=1e-4 if dtype == "float32" else 1e-10)


@given(spec=tpst.specs(shape_strategy=small_shapes), seed=st.integers(0, 2**32 - 1))
def test_zero_init_gives_exactly_zero(xp, spec, seed):
    params = spec.init("zero", like=xp.zeros(1, dtype=xp.float32), seed=seed)
    dw = to_np(spec.reconstruct(params, 3.0))
    assert np.all(dw == 0)
    # ... and only the zero block is zero (else no gradient could reach it).
    zero = [k for k, v in params.items() if not np.any(to_np(v))]
    assert sum(math.prod(spec.param_shapes[k]) for k in zero) == spec.zero_block_size
    assert len(zero) == 1 or spec.kind in ("tucker", "tucker2", "cp")  # a core / λ; several only with empty factors
    assert all(np.any(to_np(v) != 0) for k, v in params.items() if k not in zero)


@given(spec=tpst.specs(shape_strategy=small_shapes), method=st.sampled_from(["zero", "random"]))
def test_num_params_counts_elements(spec, method):
    params = spec.init(method, seed=0)
    assert spec.num_params == sum(v.size for v in params.values())
    assert {k: v.shape for k, v in params.items()} == spec.param_shapes
    assert spec.num_params == num_params_formula(spec)


@given(shape=tpst.shapes(min_ndim=1, max_ndim=4, max_side=6, max_size=600), budget=st.integers(1, 400),
       kind=st.sampled_from(tpst.KINDS))
def test_for_budget_is_the_largest_family_member_within_budget(shape, budget, kind):
    cls = tp.lookup(kind)
    if kind == "lokr" and len(shape) < 2:
        return
    f, t_max = cls.budget_family(shape)
    sizes = [f(t).num_params for t in range(1, t_max + 1)]
    assert sizes == sorted(sizes)  # the family never shrinks
    if sizes[0] > budget:
        with pytest.raises(tp.RankError, match="budget"):
            tp.ranks.for_budget(kind, shape, budget)
        return
    spec = tp.ranks.for_budget(kind, shape, budget)
    assert spec.num_params <= budget
    assert spec.num_params == max(s for s in sizes if s <= budget)
    assert tp.ranks.match(spec, kind).num_params == spec.num_params


def _three_stage(p_out, s, p_in, mg, shape):
    """Dense P_out ×_0 S ×_1 P_in with explicit loops over the middle's groups."""
    s = to_np(s)
    p_out = np.eye(shape[0]) if p_out is None else to_np(p_out)
    m_out = s.shape[0]
    if mg > 1:  # block-diagonal: group g maps input column g to output g
        mid = np.zeros((m_out, mg, *s.shape[2:]))
        for g in range(mg):
            mid[g, g] = s[g, 0]
        s = mid
    p_in = np.eye(shape[1]) if p_in is None else to_np(p_in)
    out = np.tensordot(p_out, s, axes=([1], [0]))
    return np.moveaxis(np.tensordot(out, p_in, axes=([1], [1])), -1, 1)


@given(case=tpst.spec_and_params(shape_strategy=tpst.shapes(min_ndim=2, max_ndim=4, max_side=4)),
       scale=st.floats(-2, 2))
def test_factored_and_lora_factors_rebuild_delta(case, scale):
    spec, params = case
    want = scale * dense(spec, params)
    f = spec.factored(params, scale)
    if f is None:
        assert spec.kind == "lokr"
    else:
        np.testing.assert_allclose(_three_stage(*f, spec.shape), want, rtol=1e-10, atol=1e-10)
    ba = spec.lora_factors(params, scale)
    if ba is None:
        assert spec.lora_note
    else:
        b, a = ba
        np.testing.assert_allclose(to_np(b) @ to_np(a), want.reshape(spec.shape[0], -1), rtol=1e-10, atol=1e-10)


@given(shape=tpst.shapes(min_ndim=2, max_ndim=4, max_side=5, max_size=400), r=st.integers(1, 50),
       kind=st.sampled_from(tpst.KINDS))
def test_for_ranks_clips_any_rank_to_a_valid_spec(shape, r, kind):
    spec = tp.lookup(kind).for_ranks(shape, r)
    assert spec.shape == shape and spec.num_params > 0
    assert isinstance(spec.describe_ranks(), str) and spec.describe_ranks()
    small = tp.lookup(kind).for_ranks(shape, 1)
    assert small.num_params <= spec.num_params


@given(shape=tpst.shapes(min_ndim=2, max_ndim=4, max_side=4, max_size=200), kind=st.sampled_from(tpst.KINDS),
       scale=st.sampled_from([1.0, -0.5, 3.0]), seed=st.integers(0, 100))
def test_principal_init_at_full_rank_is_exact(shape, kind, scale, seed):
    cls = tp.lookup(kind)
    rng = np.random.default_rng(seed)
    if kind == "lokr":  # exact on a Kronecker product
        base = cls.for_ranks(shape, 10**6)
        t = scale * dense(base, base.init("random", seed=seed))
        spec = base
    elif kind == "cp":  # exact on a rank-1 tensor
        spec = cls(shape, 1)
        t = scale * dense(spec, spec.init("random", seed=seed))
    else:
        spec = cls.for_ranks(shape, 10**6)
        t = rng.standard_normal(shape)
    assert spec.principal_init in spec.tensor_methods
    p = spec.init(spec.principal_init, tensor=t, scale=scale, seed=seed)
    np.testing.assert_allclose(scale * dense(spec, p), t, rtol=1e-7, atol=1e-7 * max(1.0, np.abs(t).max()))


@given(shape=small_shapes, data=st.data())
def test_lora_is_reshaped_matrix_product(shape, data):
    r = data.draw(st.integers(1, min(shape[0], math.prod(shape[1:]))))
    spec = tp.LoRA(shape, r)
    p = data.draw(tpst.params(spec))
    np.testing.assert_allclose(spec.reconstruct(p), (p["B"] @ p["A"]).reshape(shape), rtol=1e-12, atol=1e-12)


@given(shape=small_shapes, data=st.data())
def test_tucker_all_none_returns_core(shape, data):
    spec = tp.Tucker(shape, (None,) * len(shape))
    assert spec.param_shapes == {"core": shape}
    p = data.draw(tpst.params(spec))
    np.testing.assert_array_equal(spec.reconstruct(p), p["core"])


def _autograd_vjp(spec, params, ct, scale):
    torch = pytest.importorskip("torch")
    tparams = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    out = spec.reconstruct(tparams, scale)
    (out * torch.tensor(ct)).sum().backward()
    return {k: v.grad.numpy() for k, v in tparams.items()}


@given(data=st.data(), scale=st.floats(-2, 2))
def test_vjp_matches_torch_autograd(data, scale):
    spec, params = data.draw(tpst.spec_and_params(shape_strategy=small_shapes))
    ct = data.draw(tpst.cotangents(spec))
    got = spec.vjp(params, ct, scale)
    want = _autograd_vjp(spec, params, ct, scale)
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-10)


@settings(max_examples=20)
@given(data=st.data())
def test_vjp_matches_finite_differences(data):
    spec, params = data.draw(tpst.spec_and_params(shape_strategy=tpst.shapes(max_ndim=4, max_side=3)))
    ct = data.draw(tpst.cotangents(spec))
    grads = spec.vjp(params, ct, 1.3)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for k, v in params.items():
        direction = rng.standard_normal(v.shape)
        plus = dict(params, **{k: v + eps * direction})
        minus = dict(params, **{k: v - eps * direction})
        fd = np.sum(ct * (spec.reconstruct(plus, 1.3) - spec.reconstruct(minus, 1.3))) / (2 * eps)
        np.testing.assert_allclose(np.sum(grads[k] * direction), fd, rtol=1e-5, atol=1e-6)


@given(data=st.data())
def test_backends_agree(xp, data):
    spec, params = data.draw(tpst.spec_and_params(shape_strategy=small_shapes))
    ct = data.draw(tpst.cotangents(spec))
    conv = {k: xp.asarray(v) for k, v in params.items()}
    np.testing.assert_allclose(to_np(spec.reconstruct(conv, 0.7)), spec.reconstruct(params, 0.7), rtol=1e-12, atol=1e-12)
    got = spec.vjp(conv, xp.asarray(ct), 0.7)
    want = spec.vjp(params, ct, 0.7)
    for k in want:
        np.testing.assert_allclose(to_np(got[k]), want[k], rtol=1e-11, atol=1e-11)


@given(spec=tpst.specs(shape_strategy=small_shapes), seed=st.integers(0, 1000))
def test_same_seed_same_numbers_in_every_library(xp, spec, seed):
    ref = spec.init("zero", seed=seed)
    got = spec.init("zero", seed=seed, like=xp.zeros(1, dtype=xp.float64))
    for k in ref:
        np.testing.assert_array_equal(to_np(got[k]), ref[k])


@given(data=st.data(), strategy=st.sampled_from(["factorized", "rebuild", "auto"]), batch=st.integers(1, 4))
def test_apply_matches_dense_and_its_vjp_matches_autograd(data, strategy, batch):
    torch = pytest.importorskip("torch")
    spec, params = data.draw(tpst.spec_and_params(shape_strategy=tpst.shapes(min_ndim=2, max_ndim=4, max_side=4)))
    x = data.draw(tpst.arrays_for((batch, *spec.shape[1:])))
    w = dense(spec, params).reshape(spec.shape[0], -1)
    y = spec.apply(params, x, 0.9, strategy)
    np.testing.assert_allclose(y, 0.9 * x.reshape(batch, -1) @ w.T, rtol=1e-10, atol=1e-10)
    g = data.draw(tpst.arrays_for(y.shape))
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    (spec.apply(tparams, tx, 0.9, "factorized") * torch.tensor(g)).sum().backward()
    pg, xg = spec.apply_vjp(params, x, g, 0.9, strategy)
    np.testing.assert_allclose(xg, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    for k in params:
        np.testing.assert_allclose(pg[k], tparams[k].grad.numpy(), rtol=1e-10, atol=1e-10)


def test_generic_backend_is_used_for_array_api_strict():
    xs = pytest.importorskip("array_api_strict")
    from tucker_peft._namespace import einsum_backend

    assert einsum_backend(xs.asarray([1.0])) == "tucker_peft._array_api_einsum"
    assert einsum_backend(np.ones(1)) == "numpy"


_letters = "abcdef"


@st.composite
def pair_equations(draw):
    """Two-operand einsums with batch, contracted, free and summed-out indices."""
    idx = draw(st.lists(st.sampled_from(_letters), min_size=1, max_size=5, unique=True))
    ta = "".join(draw(st.permutations(draw(st.lists(st.sampled_from(idx), min_size=1, unique=True)))))
    tb = "".join(draw(st.permutations(draw(st.lists(st.sampled_from(idx), min_size=1, unique=True)))))
    pool = sorted(set(ta) | set(tb))
    out = "".join(draw(st.permutations(draw(st.lists(st.sampled_from(pool), unique=True)))))
    sizes = {s: draw(st.integers(1, 3)) for s in pool}
    return f"{ta},{tb}->{out}", sizes


@given(pair_equations(), st.integers(0, 100))
def test_generic_einsum_matches_numpy(eq_sizes, seed):
    from tucker_peft import _array_api_einsum as generic

    eq, sizes = eq_sizes
    (ta, tb), _ = eq.split("->")[0].split(","), None
    rng = np.random.default_rng(seed)
    a = rng.standard_normal([sizes[s] for s in ta])
    b = rng.standard_normal([sizes[s] for s in tb])
    np.testing.assert_allclose(generic.einsum(eq, a, b), np.einsum(eq, a, b), rtol=1e-12, atol=1e-12)
    single = f"{ta}->{''.join(s for s in ta[::-1] if s in eq.split('->')[1]) }"
    np.testing.assert_allclose(generic.einsum(single, a), np.einsum(single, a), rtol=1e-12, atol=1e-12)


@given(case=tpst.spec_and_params(shape_strategy=tpst.shapes(min_ndim=6, max_ndim=7, max_side=2)))
def test_six_and_seven_mode_weights_reconstruct_and_factor(case):
    spec, params = case
    want = 0.5 * dense(spec, params)
    np.testing.assert_allclose(spec.reconstruct(params, 0.5), want, rtol=1e-10, atol=1e-10)
    f = spec.factored(params, 0.5)
    if f is not None:
        np.testing.assert_allclose(_three_stage(*f, spec.shape), want, rtol=1e-10, atol=1e-10)
