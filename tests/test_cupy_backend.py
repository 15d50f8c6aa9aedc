"""tucker_peft.backends.cupy: DLPack hand-off (NumPy↔torch on CPU, CuPy↔torch on GPU) and CuPy-vs-NumPy parity.

The GPU tests are marked ``gpu`` and skip without a CUDA device; they compare
CuPy (and torch on CUDA) against NumPy on the same seeds.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tucker_peft as tp
from tucker_peft import TuckerPeftError
from tucker_peft.backends import cupy as tpc
from tucker_peft.optim import SGD, Adam

from .conftest import gpu_available, to_np

torch = pytest.importorskip("torch")

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="cupy needs a GPU")
needs_cuda_torch = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch needs CUDA")


def test_imports_pull_no_framework():
    code = ("import tucker_peft, tucker_peft.optim, tucker_peft.adapter, tucker_peft.fitting, tucker_peft.backends.cupy\n"
            "import sys; print(' '.join(sorted(sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    heavy = {"torch", "cupy", "safetensors", "tensorly", "jax"}
    assert not heavy & {m.split(".")[0] for m in mods}


def test_reexports():
    from tucker_peft.adapter import Adapter
    from tucker_peft.fitting import fit

    assert tpc.Adapter is Adapter and tpc.fit is fit and tpc.Adam is Adam
    for name in tpc.__all__:
        assert hasattr(tpc, name), name


# -- DLPack on the CPU: the same code path as CuPy↔torch on a GPU --------------

def test_numpy_to_torch_is_zero_copy():
    a = np.arange(12.0).reshape(3, 4)
    t = tpc.to_torch(a)
    assert isinstance(t, torch.Tensor) and tpc.shares_memory(a, t)
    t[0, 0] = 42.0
    assert a[0, 0] == 42.0
    back = tpc.from_torch(t)
    assert isinstance(back, np.ndarray) and tpc.shares_memory(back, a)


def test_params_round_trip_share_memory():
    spec = tp.Tucker((6, 5, 3), 2)
    params = spec.init("random", seed=0)
    tparams = tpc.params_to_torch(params)
    assert set(tparams) == set(params)
    for k in params:
        assert tpc.shares_memory(tparams[k], params[k])
    # The core computes the same delta in either library.
    np.testing.assert_allclose(to_np(spec.reconstruct(tparams)), spec.reconstruct(params), rtol=1e-12)
    back = tpc.params_from_torch(tparams)
    assert all(tpc.shares_memory(back[k], params[k]) for k in params)


def test_from_torch_detaches_grad_tensors():
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    a = tpc.from_torch({"w": t})["w"]
    assert isinstance(a, np.ndarray) and tpc.shares_memory(a, t)


def test_hand_off_to_any_consumer_keeps_structure():
    a, b = np.zeros(2), np.ones((2, 2))
    out = tpc.hand_off({"x": [a, (b,)]}, np.from_dlpack)
    assert tpc.shares_memory(out["x"][0], a) and tpc.shares_memory(out["x"][1][0], b)
    assert isinstance(out["x"][1], tuple)


def test_hand_off_errors_are_clear():
    with pytest.raises(TuckerPeftError, match="obj: expected arrays that implement __dlpack__, got str"):
        tpc.hand_off({"a": "text"}, np.from_dlpack)
    with pytest.raises(TuckerPeftError, match="expected torch tensors, got numpy"):
        tpc.from_torch(np.zeros(2))
    with pytest.raises(TuckerPeftError, match="params: expected a dict"):
        tpc.params_to_torch([np.zeros(2)])
    with pytest.raises(TuckerPeftError, match="x: expected a NumPy, CuPy or torch array"):
        tpc.data_ptr([1])


def test_require_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(TuckerPeftError, match=r"pip install tucker-peft\[cupy\]"):
        tpc.require_cupy()
    assert tpc.gpu_available() is False
    tpc.synchronize()  # a no-op without a GPU


def test_adapter_trained_in_numpy_drops_into_torch():
    spec = tp.Tucker2((8, 6, 3, 3), 3)
    rng = np.random.default_rng(0)
    W = rng.standard_normal(spec.shape)
    x = rng.standard_normal((5, 6, 3, 3))
    ad = tpc.Adapter(spec, scale=2.0, base=W, optimizer=Adam(0.01), seed=0)
    for _ in range(3):
        y = ad.apply_linear(x)
        ad.backward(y)
        ad.step()
    t = tpc.adapter_to_torch(ad)
    np.testing.assert_allclose(to_np(t.apply_linear(torch.as_tensor(x))), ad.apply_linear(x), rtol=1e-12)
    assert all(tpc.shares_memory(t.params[k], ad.params[k]) for k in ad.params)
    back = tpc.adapter_from_torch(t)
    assert all(isinstance(v, np.ndarray) and tpc.shares_memory(v, ad.params[k]) for k, v in back.params.items())


# -- GPU: CuPy and torch-on-CUDA against NumPy on the same seeds ---------------

SPECS = [tp.Tucker((24, 16, 3, 3), (6, 5, 3, 2)), tp.Tucker2((24, 16, 3, 3), 4), tp.CP((24, 16, 3, 3), 6),
         tp.LoRA((24, 16, 3, 3), 4)]
IDS = ["tucker", "tucker2", "cp", "lora"]


def _target(seed=0):
    return np.random.default_rng(seed).standard_normal(SPECS[0].shape)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["als", "adam"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_cupy_fit_matches_numpy(spec, method):
    import cupy

    t = _target()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Adam from the decomposition init would start at (LoRA) or near an
        # optimum, where the gradient is rounding noise that Adam's scaling
        # amplifies differently per library; start it from 'zero' instead.
        kw = {"init": "zero"} if method == "adam" else {}
        ref = tpc.fit(spec, t, steps=6, method=method, seed=3, **kw)
        got = tpc.fit(spec, cupy.asarray(t), steps=6, method=method, seed=3, **kw)
    assert all(isinstance(v, cupy.ndarray) for v in got.params.values())
    np.testing.assert_allclose(got.rel_errors, ref.rel_errors, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(to_np(got.delta()), ref.delta(), rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
@needs_gpu
def test_cupy_fit_float32():
    import cupy

    t = _target().astype(np.float32)
    got = tpc.fit(SPECS[0], cupy.asarray(t), steps=4)
    ref = tpc.fit(SPECS[0], t.astype(np.float64), steps=4)
    assert got.params["core"].dtype == cupy.float32
    np.testing.assert_allclose(got.rel_errors, ref.rel_errors, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_cupy_adapter_training_matches_numpy(tmp_path):
    import cupy

    spec = SPECS[0]
    rng = np.random.default_rng(1)
    W, x, t = (rng.standard_normal(spec.shape), rng.standard_normal((32, *spec.shape[1:])),
               rng.standard_normal((32, spec.shape[0])))
    runs = {}
    for name, conv in (("numpy", np.asarray), ("cupy", cupy.asarray)):
        ad = tpc.Adapter(spec, spec.init("zero", like=conv(W), seed=4), scale=2.0, base=conv(W),
                         optimizer=Adam(lr=0.01))
        for _ in range(5):
            y = ad.apply_linear(conv(x))
            ad.backward(y - conv(t))
            ad.step()
        runs[name] = ad
    np.testing.assert_allclose(to_np(runs["cupy"].delta()), runs["numpy"].delta(), rtol=1e-8, atol=1e-10)
    # Checkpoints written from CuPy load back to the GPU.
    runs["cupy"].save(tmp_path / "a.safetensors")
    back = tpc.Adapter.load(tmp_path / "a.safetensors", like=cupy.zeros(1), optimizer=Adam(lr=0.01))
    assert isinstance(back.params["core"], cupy.ndarray) and back.optimizer.t == 5
    np.testing.assert_array_equal(to_np(back.delta()), to_np(runs["cupy"].delta()))


@pytest.mark.gpu
@needs_gpu
def test_cupy_steps_never_synchronize():
    import cupy
    import cupyx
    from array_api_compat import array_namespace

    from tucker_peft.fitting import _Error

    spec = SPECS[0]
    rng = np.random.default_rng(2)
    W, x, g = (cupy.asarray(rng.standard_normal(spec.shape)), cupy.asarray(rng.standard_normal((8, *spec.shape[1:]))),
               cupy.asarray(rng.standard_normal((8, spec.shape[0]))))
    t = cupy.asarray(_target())
    cp_spec = SPECS[2]
    ad = tpc.Adapter(spec, spec.init("random", like=W, seed=0), base=W, optimizer=Adam(lr=0.01))
    sgd = tpc.Adapter(spec, spec.init("random", like=W, seed=0), base=W, optimizer=SGD(lr=0.01, momentum=0.9))
    xp = array_namespace(t)
    tucker = spec.als_solver(t, 1.0, spec.init("hosvd", tensor=t))
    cpals = cp_spec.als_solver(t, 1.0, cp_spec.init("random", like=t, seed=0))
    lora_spec = SPECS[3]
    lora = lora_spec.als_solver(t, 1.0, lora_spec.init("random", like=t, seed=0))
    err = _Error(xp, spec, t, 1.0)
    cupy.cuda.Device().synchronize()
    with cupyx.allow_synchronize(False):
        for a in (ad, sgd):
            for _ in range(2):
                a.apply_linear(x)
                a.backward(g, input_grad=True)
                a.step()
        errs = [err(tucker.sweep()) for _ in range(2)] + [cupy.sqrt(cupy.sum(cpals.sweep()["weights"] ** 2))]
        errs.append(cupy.sum(lora.sweep()["B"] ** 2))
    # Outside the guard the results can be read.
    assert all(0 <= float(e) < math.inf for e in errs)


@pytest.mark.gpu
@needs_gpu
@needs_cuda_torch
def test_cupy_torch_zero_copy_on_gpu():
    import cupy

    spec = SPECS[1]
    params = spec.init("random", like=cupy.zeros(1), seed=0)
    tparams = tpc.params_to_torch(params)
    for k in params:
        assert tparams[k].is_cuda and tpc.shares_memory(tparams[k], params[k])
    first = (0,) * params["core"].ndim
    tparams["core"][first] += 1.0
    torch.cuda.synchronize()
    assert float(params["core"][first]) == pytest.approx(float(tparams["core"][first]))
    back = tpc.params_from_torch(tparams)
    assert all(isinstance(v, cupy.ndarray) and tpc.shares_memory(v, params[k]) for k, v in back.items())
    # A CuPy-trained adapter used from torch gives the same outputs.
    ad = tpc.Adapter(spec, params, scale=1.5)
    x = cupy.asarray(np.random.default_rng(0).standard_normal((4, *spec.shape[1:])))
    t_ad = tpc.adapter_to_torch(ad)
    np.testing.assert_allclose(to_np(t_ad.apply(tpc.to_torch(x))), to_np(ad.apply(x)), rtol=1e-12)


@pytest.mark.gpu
@needs_cuda_torch
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_torch_cuda_fit_matches_numpy(spec):
    t = _target()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tpc.fit(spec, t, steps=4, seed=3)
        got = tpc.fit(spec, torch.as_tensor(t, device="cuda"), steps=4, seed=3)
    assert got.params[next(iter(got.params))].is_cuda
    np.testing.assert_allclose(got.rel_errors, ref.rel_errors, rtol=1e-7, atol=1e-10)
