"""Library detection goes by type (array-api-compat's checks), never by module-name strings."""

from __future__ import annotations

import numpy as np
import pytest

from tucker_peft import Tucker
from tucker_peft._namespace import einsum_backend, library_of, to_numpy
from tucker_peft._planner import contract, contract_vjp


class MyArr(np.ndarray):
    """A NumPy subclass defined outside NumPy (its ``__module__`` is this test module)."""


class Disguised(np.ndarray):
    """A NumPy subclass whose module name claims another library."""


Disguised.__module__ = "torch.fake"


@pytest.mark.parametrize("cls", [MyArr, Disguised])
def test_numpy_subclass_is_numpy(cls):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    x, y = a.view(cls), b.view(cls)
    assert library_of(x) == "numpy"
    assert einsum_backend(x) == "numpy"
    np.testing.assert_array_equal(to_numpy(x), a)
    np.testing.assert_allclose(np.asarray(contract("ij,jk->ik", x, y)), a @ b, rtol=1e-12)
    ga, gb = contract_vjp("ij,jk->ik", [x, y], np.ones((4, 5)).view(cls))
    np.testing.assert_allclose(np.asarray(ga), np.ones((4, 5)) @ b.T, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gb), a.T @ np.ones((4, 5)), rtol=1e-12)


def test_numpy_subclass_through_a_spec():
    spec = Tucker((6, 5), ranks=2)
    params = spec.init("random", seed=0)
    dense = np.asarray(spec.reconstruct(params))
    sub = {k: np.asarray(v).view(Disguised) for k, v in params.items()}
    np.testing.assert_allclose(np.asarray(spec.reconstruct(sub)), dense, rtol=1e-12)


def test_torch_subclass_is_torch():
    torch = pytest.importorskip("torch")

    class Sub(torch.Tensor):
        pass

    Sub.__module__ = "not_torch"
    t = torch.ones(2, 3).as_subclass(Sub)
    assert library_of(t) == "torch"
    assert einsum_backend(t) == "torch"
    np.testing.assert_array_equal(to_numpy(t), np.ones((2, 3)))
