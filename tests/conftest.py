"""Shared fixtures: the ``xp`` fixture over every available array library, and hypothesis profiles.

JAX joins ``xp`` when ``TUCKER_PEFT_TEST_JAX=1`` (a few minutes: XLA compiles
every shape); ``tests/test_kinds_jax.py`` covers it in every run.

Profiles: ``ci`` (default; derandomized, so CI is deterministic) and ``heavy``
(many more examples), chosen with ``TUCKER_PEFT_HYPOTHESIS_PROFILE=heavy``.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "heavy", max_examples=600, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("TUCKER_PEFT_HYPOTHESIS_PROFILE", "ci"))


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _namespace(name: str):
    if name == "numpy":
        return importlib.import_module("array_api_compat.numpy")
    if name == "torch":
        pytest.importorskip("torch")
        return importlib.import_module("array_api_compat.torch")
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if name == "jax":
        if os.environ.get("TUCKER_PEFT_TEST_JAX") != "1":
            # XLA compiles every new shape: the whole sweep takes minutes. tests/test_kinds_jax.py always runs.
            pytest.skip("the full JAX sweep runs with TUCKER_PEFT_TEST_JAX=1")
        jax = pytest.importorskip("jax", reason="JAX is optional: pip install jax to test the core on it")
        # float64 like the other libraries (JAX defaults to float32); only JAX reads this switch.
        jax.config.update("jax_enable_x64", True)
        return importlib.import_module("jax.numpy")
    if name == "cupy":
        if not gpu_available():
            pytest.skip("cupy needs a GPU")
        return importlib.import_module("array_api_compat.cupy")
    raise AssertionError(name)


XP_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("torch", id="torch"),
    pytest.param("array_api_strict", id="array_api_strict"),
    pytest.param("jax", id="jax"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


@pytest.fixture(params=XP_PARAMS)
def xp(request):
    """An array-API namespace: numpy, torch (CPU), array_api_strict, jax (CPU, if installed), cupy (GPU only)."""
    return _namespace(request.param)


def to_np(a) -> np.ndarray:
    from tucker_peft._namespace import to_numpy

    return np.asarray(to_numpy(a))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer tests")
