"""The core on JAX (CPU): every kind's reconstruct and vjp against NumPy and ``jax.grad``, under ``jax.jit``.

A few fixed shapes keep XLA's per-shape compilation short; the full sweep of
the ``xp`` fixture over JAX runs with ``TUCKER_PEFT_TEST_JAX=1``.
"""

from __future__ import annotations

import numpy as np
import pytest

import tucker_peft as tp

jax = pytest.importorskip("jax", reason="JAX is optional: pip install jax")
jnp = pytest.importorskip("jax.numpy")

SPECS = [
    tp.Tucker((6, 4, 3), (2, 3, None)),
    tp.Tucker2((6, 4, 3), 2),
    tp.CP((6, 4, 3), 3),
    tp.LoRA((6, 4, 3), 2),
    tp.TT((6, 8), 2, tensorize={1: (2, 4)}),
    tp.LoKr((6, 8, 3), 1),
    tp.LoHa((6, 4, 3), 2),
]


@pytest.fixture(autouse=True, scope="module")
def _x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_reconstruct_and_vjp_match_numpy_and_jax_grad_under_jit(spec):
    p = spec.init("random", seed=0)
    ct = np.random.default_rng(1).standard_normal(spec.shape)
    jp = {k: jnp.asarray(v) for k, v in p.items()}
    dw = jax.jit(lambda q: spec.reconstruct(q, 0.7))(jp)
    assert isinstance(dw, jax.Array) and dw.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(dw), spec.reconstruct(p, 0.7), rtol=1e-12, atol=1e-12)
    got = jax.jit(lambda q, c: spec.vjp(q, c, 0.7))(jp, jnp.asarray(ct))
    want = jax.grad(lambda q: jnp.sum(spec.reconstruct(q, 0.7) * ct))(jp)
    for k in p:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(got[k]), spec.vjp(p, ct, 0.7)[k], rtol=1e-10, atol=1e-12)


def test_zero_init_and_principal_init_on_jax():
    spec = tp.TT((6, 8), 2, tensorize={1: (2, 4)})
    z = spec.init("zero", like=jnp.zeros(1), seed=0)
    assert all(isinstance(v, jax.Array) for v in z.values())
    assert not np.any(np.asarray(spec.reconstruct(z)))
    t = jnp.asarray(np.random.default_rng(2).standard_normal((6, 8)))
    full = tp.TT((6, 8), 100, tensorize={1: (2, 4)})
    q = full.init("ttsvd", tensor=t)
    np.testing.assert_allclose(np.asarray(full.reconstruct(q)), np.asarray(t), atol=1e-10)
