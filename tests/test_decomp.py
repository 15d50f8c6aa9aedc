"""HOSVD, HOOI, CP fitting and decomposition-based initialisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import testing as tpst

from .conftest import to_np

shapes = tpst.shapes(min_ndim=1, max_ndim=5, max_side=5, max_size=400)


def unfold_sv2(t: np.ndarray, n: int) -> np.ndarray:
    """Squared singular values of the mode-n unfolding (NumPy SVD, the reference)."""
    m = np.moveaxis(t, n, 0).reshape(t.shape[n], -1)
    return np.linalg.svd(m, compute_uv=False) ** 2


def rebuild(core, factors):
    return tp.multilinear_project(core, [None if u is None else u.T for u in factors])


@given(shape=shapes, seed=st.integers(0, 1000), sequential=st.booleans())
def test_full_rank_hosvd_reconstructs(xp, shape, seed, sequential):
    t = np.random.default_rng(seed).standard_normal(shape)
    core, factors = tp.hosvd(xp.asarray(t), shape, sequential=sequential)
    np.testing.assert_allclose(to_np(rebuild(core, factors)), t, rtol=1e-9, atol=1e-9)
    for u in factors:
        u = to_np(u)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-9)


@given(data=st.data(), sequential=st.booleans())
def test_truncated_hosvd_error_within_discarded_energy(data, sequential):
    shape = data.draw(shapes)
    ranks = data.draw(tpst.tucker_ranks(shape))
    t = data.draw(tpst.arrays_for(shape))
    core, factors = tp.hosvd(t, ranks, sequential=sequential)
    err2 = np.sum((t - rebuild(core, factors)) ** 2)
    bound = sum(unfold_sv2(t, n)[r:].sum() for n, r in enumerate(ranks) if r is not None)
    assert err2 <= bound * (1 + 1e-9) + 1e-10


def test_hosvd_factors_are_leading_singular_vectors():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((12, 9, 4))
    _, factors = tp.hosvd(t, (3, 2, 2), sequential=False)
    for n, u in enumerate(factors):
        m = np.moveaxis(t, n, 0).reshape(t.shape[n], -1)
        ref = np.linalg.svd(m)[0][:, : u.shape[1]]
        np.testing.assert_allclose(np.abs(u.T @ ref), np.eye(u.shape[1]), atol=1e-8)


def test_hosvd_tall_unfolding_and_low_rank_tensor():
    rng = np.random.default_rng(1)
    # Mode 0 (40) exceeds the product of the others (6): the SVD path.
    g = rng.standard_normal((3, 2, 3))
    us = [np.linalg.qr(rng.standard_normal((d, r)))[0] for d, r in ((40, 3), (2, 2), (3, 3))]
    t = tp.multilinear_project(g, [u.T for u in us])
    core, factors = tp.hosvd(t, (3, 2, 3))
    np.testing.assert_allclose(rebuild(core, factors), t, atol=1e-10)


def test_hosvd_is_reproducible_across_libraries(xp):
    t = np.random.default_rng(2).standard_normal((8, 6, 3))
    core_ref, f_ref = tp.hosvd(t, (4, 3, None))
    core, f = tp.hosvd(xp.asarray(t), (4, 3, None))
    np.testing.assert_allclose(to_np(core), core_ref, atol=1e-10)
    assert f[2] is None
    for a, b in zip(f, f_ref):
        if a is not None:
            np.testing.assert_allclose(to_np(a), b, atol=1e-10)


def test_hooi_never_worse_than_hosvd():
    rng = np.random.default_rng(3)
    low = tp.multilinear_project(rng.standard_normal((3, 3, 3)), [rng.standard_normal((3, d)) for d in (10, 9, 8)])
    t = low + 0.5 * rng.standard_normal((10, 9, 8))
    c0, f0 = tp.hosvd(t, (3, 3, 3))
    c1, f1 = tp.hooi(t, (3, 3, 3), n_iter=200, tol=0)
    e0 = np.linalg.norm(t - rebuild(c0, f0))
    e1 = np.linalg.norm(t - rebuild(c1, f1))
    assert e1 <= e0 + 1e-12
    # HOOI's fixed point: each factor spans the leading subspace given the others.
    for n in range(3):
        others = [u if m != n else None for m, u in enumerate(f1)]
        y = tp.multilinear_project(t, others)
        ref = np.linalg.svd(np.moveaxis(y, n, 0).reshape(t.shape[n], -1))[0][:, :3]
        assert np.linalg.norm(ref @ ref.T - f1[n] @ f1[n].T) < 1e-6


def test_hooi_recovers_exact_low_rank(xp):
    rng = np.random.default_rng(4)
    g = rng.standard_normal((2, 3, 2))
    us = [np.linalg.qr(rng.standard_normal((d, r)))[0] for d, r in ((7, 2), (6, 3), (5, 2))]
    t = tp.multilinear_project(g, [u.T for u in us])
    core, factors = tp.hooi(xp.asarray(t), (2, 3, 2), n_iter=3)
    np.testing.assert_allclose(to_np(rebuild(core, factors)), t, atol=1e-9)


def test_parafac_fits_exact_cp_tensor():
    rng = np.random.default_rng(5)
    spec = tp.CP((6, 5, 4), 2)
    p = spec.init("random", seed=5)
    t = spec.reconstruct(p)
    w, fs = tp.parafac(t, 2, n_iter=500, tol=1e-14)
    approx = tp.CP(t.shape, 2).reconstruct({"weights": w, **{f"factor_{n}": f for n, f in enumerate(fs)}})
    assert np.linalg.norm(approx - t) / np.linalg.norm(t) < 1e-5
    del rng


@pytest.mark.parametrize("kind,kw", [("tucker", {"ranks": (3, 2, 2)}), ("cp", {"rank": 3}), ("lora", {"rank": 2}),
                                     ("tucker2", {"ranks": 2})])
def test_decomposition_init_residual_keeps_weight(xp, kind, kw):
    w = np.random.default_rng(6).standard_normal((6, 5, 3))
    spec = tp.parametrization(kind, w.shape, **kw)
    params, residual = spec.init("hosvd", tensor=xp.asarray(w), scale=2.5, return_residual=True, seed=0)
    dw = to_np(spec.reconstruct(params, 2.5))
    assert np.linalg.norm(dw) > 0.3 * np.linalg.norm(w)  # a real principal part, not zero
    np.testing.assert_allclose(to_np(residual) + dw, w, atol=1e-10)


def test_tucker_hosvd_init_is_the_projection():
    w = np.random.default_rng(7).standard_normal((6, 5, 4))
    spec = tp.Tucker(w.shape, (3, 2, None))
    params = spec.init("hosvd", tensor=w, scale=2.0)
    core, factors = tp.hosvd(w, (3, 2, None))
    np.testing.assert_allclose(params["core"] * 2.0, core)
    zero = spec.init("hosvd", tensor=w, core="zero")
    assert np.all(zero["core"] == 0) and np.all(spec.reconstruct(zero) == 0)
    np.testing.assert_allclose(zero["factor_0"], factors[0])


def test_lora_svd_init_is_eckart_young():
    w = np.random.default_rng(8).standard_normal((7, 4, 3))
    spec = tp.LoRA(w.shape, 3)
    params = spec.init("svd", tensor=w, scale=-0.5)
    m = w.reshape(7, 12)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(-0.5 * params["B"] @ params["A"], (u[:, :3] * s[:3]) @ vh[:3], atol=1e-10)


def test_hosvd_init_casts_to_like_dtype():
    torch = pytest.importorskip("torch")
    w = torch.randn(6, 5, 3, dtype=torch.float64)
    p = tp.Tucker(w.shape, 2).init("hosvd", tensor=w, dtype="float32")
    assert all(v.dtype == torch.float32 for v in p.values())


@settings(max_examples=25)
@given(shape=shapes, energy=st.floats(0.05, 1.0), seed=st.integers(0, 100))
def test_by_energy_is_the_smallest_rank_that_keeps_energy(shape, energy, seed):
    t = np.random.default_rng(seed).standard_normal(shape)
    ranks = tp.ranks.by_energy(t, energy)
    for n, r in enumerate(ranks):
        sv2 = unfold_sv2(t, n)
        frac = np.concatenate([np.cumsum(sv2) / sv2.sum(), np.ones(shape[n] - len(sv2))])
        assert frac[r - 1] >= energy - 1e-9
        assert r == 1 or frac[r - 2] < energy + 1e-9
    tp.Tucker(shape, ranks)  # always a valid spec


def test_by_energy_edge_cases():
    assert tp.ranks.by_energy(np.zeros((4, 3)), 0.9) == (1, 1)
    assert tp.ranks.by_energy(np.ones((4, 3)), (0.5, None)) == (1, None)
    with pytest.raises(tp.TuckerPeftError, match=r"energy\[0\]: expected a float in \(0, 1\]"):
        tp.ranks.by_energy(np.ones((4, 3)), 1.5)
    with pytest.raises(tp.TuckerPeftError, match="energy"):
        tp.ranks.by_energy(np.ones((4, 3)), (0.5,))


@pytest.mark.parametrize("rank", [3, 6])
def test_tall_unfolding_singular_vectors_match_svd_even_when_rank_deficient(rank):
    from tucker_peft._decomp import leading_left_singular
    rng = np.random.default_rng(0)
    m = rng.standard_normal((60, rank)) @ rng.standard_normal((rank, 12))
    x = m.reshape(60, 3, 4)  # mode-0 unfolding is tall: 60 × 12
    u, sigma2 = leading_left_singular(np, x, 0, 5)
    assert u.shape == (60, 5)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-10)
    s = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(sigma2[:12], s ** 2, rtol=1e-8, atol=1e-8 * s[0] ** 2)
    assert np.all(sigma2[12:] == 0)
    # The leading min(rank, 5) columns span the top singular subspace.
    keep = min(rank, 5)
    uu, _, _ = np.linalg.svd(m, full_matrices=False)
    p_ref = uu[:, :keep] @ uu[:, :keep].T
    np.testing.assert_allclose(u[:, :keep] @ u[:, :keep].T, p_ref, atol=1e-8)


# -- numerical inputs ----------------------------------------------------------------

NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("call", [
    lambda t: tp.hosvd(t, 2), lambda t: tp.hosvd(t, 2, sequential=False), lambda t: tp.hooi(t, 2),
    lambda t: tp.ranks.by_energy(t, 0.9), lambda t: tp.parafac(t, 2, n_iter=2),
    lambda t: tp.Tucker(t.shape, 2).init("hosvd", tensor=t),
], ids=["hosvd", "hosvd-classic", "hooi", "by_energy", "parafac", "init"])
def test_nonfinite_tensor_is_refused_before_any_decomposition(call, bad):
    t = np.random.default_rng(0).standard_normal((5, 4, 3))
    t[1, 2, 0] = bad
    with pytest.raises(tp.TuckerPeftError, match="tensor: contains NaN or Inf"):
        call(t)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool])
@pytest.mark.parametrize("call", [lambda t: tp.hosvd(t, 2), lambda t: tp.hooi(t, 2),
                                  lambda t: tp.ranks.by_energy(t, 0.9), lambda t: tp.parafac(t, 2, n_iter=2)],
                         ids=["hosvd", "hooi", "by_energy", "parafac"])
def test_integer_and_bool_tensors_are_refused_not_zeroed(call, dtype):
    # Decomposed in their own dtype they gave all-zero factors (relative error 1.0) without a word.
    t = (np.random.default_rng(0).standard_normal((5, 4, 3)) > 0).astype(dtype)
    with pytest.raises(tp.TuckerPeftError, match=r"tensor: expected a real floating dtype, got .*cast it first"):
        call(t)
    core, factors = tp.hosvd(t.astype(np.float64), 2)  # the cast the message asks for works
    assert np.abs(factors[0]).max() > 0


def test_direct_decomposition_is_not_capped_by_the_spec_mode_limit():
    t = np.random.default_rng(0).standard_normal((2,) * 13)
    core, factors = tp.hosvd(t, 1)
    assert core.shape == (1,) * 13 and len(factors) == 13
