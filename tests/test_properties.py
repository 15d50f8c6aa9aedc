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
    return (p["B"] @ p["A"]).reshape(spec.shape)


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
    # ... while the factors are not all zero (else no gradient could reach the core).
    factors = [v for k, v in params.items() if k.startswith(("factor_", "A"))]
    assert all(np.any(to_np(v) != 0) for v in factors)


@given(spec=tpst.specs(shape_strategy=small_shapes), method=st.sampled_from(["zero", "random"]))
def test_num_params_counts_elements(spec, method):
    params = spec.init(method, seed=0)
    assert spec.num_params == sum(v.size for v in params.values())
    assert {k: v.shape for k, v in params.items()} == spec.param_shapes


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
    from tucker_peft._dispatch import einsum_backend

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
