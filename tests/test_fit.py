"""fit(): ALS and Adam against independent optima (Eckart–Young, exact low-rank targets)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import tucker_peft as tp
from tucker_peft import TuckerPeftError
from tucker_peft.fitting import FitResult, budget_sweep, fit
from tucker_peft.optim import SGD, Adam

from .conftest import to_np


@pytest.fixture(autouse=True)
def _quiet_tensorly():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD")
        yield


def _target(shape=(12, 9, 3, 3), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


SPECS = [
    tp.Tucker((12, 9, 3, 3), (4, 3, 2, 2)),
    tp.Tucker2((12, 9, 3, 3), 3),
    tp.CP((12, 9, 3, 3), 5),
    tp.LoRA((12, 9, 3, 3), 3),
]
IDS = ["tucker", "tucker2", "cp", "lora"]


def _true_error(spec, params, target, scale):
    dw = to_np(spec.reconstruct(params, scale))
    return np.linalg.norm(dw - target) / np.linalg.norm(target)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_als_error_never_increases(xp, spec):
    t = _target()
    res = fit(spec, xp.asarray(t), steps=8, method="als", scale=1.5)
    e = res.rel_errors
    assert e.shape == (9,) and res.steps == 8
    # Non-increasing up to rounding.
    assert np.all(np.diff(e) <= 1e-12 * e[0]), e
    assert res.final_error <= res.init_error * (1 + 1e-12)
    # The reported error is the true one of the returned params, which stay in xp.
    np.testing.assert_allclose(res.final_error, _true_error(spec, res.params, t, 1.5), rtol=1e-10)
    assert type(res.params[next(iter(res.params))]) is type(xp.asarray(t))


def test_hooi_improves_on_hosvd():
    t = _target()
    res = fit(SPECS[0], t, steps=10)
    hosvd_params = SPECS[0].init("hosvd", tensor=t)
    np.testing.assert_allclose(res.init_error, _true_error(SPECS[0], hosvd_params, t, 1.0), rtol=1e-12)
    assert res.final_error < res.init_error - 1e-4


def test_tucker_single_mode_reaches_eckart_young():
    # Factoring only mode 0 is a truncated SVD of the mode-0 unfolding.
    t = _target((10, 6, 4))
    spec = tp.Tucker(t.shape, (3, None, None))
    s = np.linalg.svd(t.reshape(10, -1), compute_uv=False)
    best = math.sqrt(np.sum(s[3:] ** 2)) / np.linalg.norm(t)
    res = fit(spec, t, steps=2, init="random")
    np.testing.assert_allclose(res.final_error, best, rtol=1e-10)


@pytest.mark.parametrize("method", ["als", "adam"])
def test_lora_fit_is_the_truncated_svd_optimum(xp, method):
    t = _target()
    s = np.linalg.svd(t.reshape(12, -1), compute_uv=False)
    best = math.sqrt(np.sum(s[3:] ** 2)) / np.linalg.norm(t)
    res = fit(SPECS[3], xp.asarray(t), steps=5, method=method, scale=2.0, lr=1e-4)
    np.testing.assert_allclose(res.init_error, best, rtol=1e-10)
    np.testing.assert_allclose(res.final_error, best, rtol=1e-6)


def test_lora_als_from_random_init_reaches_the_optimum():
    t = _target((9, 7))
    s = np.linalg.svd(t, compute_uv=False)
    best = math.sqrt(np.sum(s[2:] ** 2)) / np.linalg.norm(t)
    res = fit(tp.LoRA(t.shape, 2), t, steps=200, init="random", tol=1e-14)
    assert res.init_error > best + 0.1
    np.testing.assert_allclose(res.final_error, best, rtol=1e-6)


def test_exact_low_rank_targets_are_recovered(xp):
    rng = np.random.default_rng(4)
    # Exact CP rank 3 and exact multilinear rank (2, 3, 2).
    cp_t = np.einsum("r,ir,jr,kr->ijk", rng.uniform(1, 2, 3), *[rng.standard_normal((d, 3)) for d in (8, 7, 6)])
    res = fit(tp.CP(cp_t.shape, 3), xp.asarray(cp_t), steps=60, init_options={"n_iter": 1})
    assert res.final_error < 1e-6
    core = rng.standard_normal((2, 3, 2))
    tk = np.einsum("abc,ia,jb,kc->ijk", core, *[rng.standard_normal((d, r)) for d, r in ((8, 2), (7, 3), (6, 2))])
    res = fit(tp.Tucker(tk.shape, (2, 3, 2)), xp.asarray(tk), steps=1)
    assert res.final_error < 1e-10


def test_cp_als_matches_tensorly_quality():
    # Our device ALS continues tensorly's: after the same number of sweeps it is as good.
    import tensorly as tl
    from tensorly.decomposition import parafac

    t = _target((10, 8, 6), seed=3)
    res = fit(tp.CP(t.shape, 4), t, steps=30, init_options={"n_iter": 0})
    cp = parafac(tl.tensor(t), 4, n_iter_max=30, init="svd", tol=0, normalize_factors=True)
    theirs = np.linalg.norm(tl.cp_to_tensor(cp) - t) / np.linalg.norm(t)
    assert res.final_error <= theirs + 1e-6


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_adam_lowers_the_error_from_the_decomposition(xp, spec):
    t = _target()
    res = fit(spec, xp.asarray(t), steps=40, method="adam", lr=1e-3, scale=0.5)
    if spec.kind == "lora":
        # Already optimal (Eckart–Young): Adam's normalised steps may only wander at rounding level.
        assert res.final_error <= res.init_error * (1 + 1e-6)
    else:
        assert res.final_error < res.init_error
    np.testing.assert_allclose(res.final_error, _true_error(spec, res.params, t, 0.5), rtol=1e-10)


def test_adam_from_zero_init_learns():
    t = _target((8, 6))
    res = fit(tp.Tucker(t.shape, 6), t, steps=300, method="adam", init="zero", optimizer=Adam(lr=0.05))
    assert res.init_error == pytest.approx(1.0)
    assert res.final_error < 0.05


def test_custom_optimizer_and_params_init():
    t = _target((8, 6))
    spec = tp.LoRA(t.shape, 2)
    start = spec.init("random", seed=1)
    opt = SGD(lr=0.05, momentum=0.9)
    res = fit(spec, t, steps=50, method="adam", init=start, optimizer=opt)
    assert opt.t == 50 and res.final_error < res.init_error


def test_scale_is_respected():
    t = _target()
    res = fit(SPECS[0], t, steps=3, scale=-4.0)
    other = fit(SPECS[0], t, steps=3, scale=1.0)
    np.testing.assert_allclose(to_np(res.delta()), to_np(other.delta()), atol=1e-10)
    np.testing.assert_allclose(res.params["core"] * -4.0, other.params["core"], atol=1e-10)


def test_zero_target_reports_absolute_errors():
    res = fit(SPECS[0], np.zeros(SPECS[0].shape), steps=2)
    assert np.all(res.rel_errors == 0)


def test_callback_and_tol_stop_early():
    t = _target()
    seen = []

    def cb(step, params, err):
        seen.append((step, float(err)))
        return step == 3

    res = fit(SPECS[0], t, steps=10, callback=cb)
    assert res.steps == 3 and [s for s, _ in seen] == [1, 2, 3]
    np.testing.assert_allclose([e for _, e in seen], res.rel_errors[1:])
    res = fit(SPECS[3], t, steps=10, tol=1e-9)
    assert res.steps == 1


def test_no_host_reads_during_steps():
    from ._sync_guard import HostReadCounter, guarded

    t = guarded(_target())
    for spec in SPECS:
        for method in ("als", "adam"):
            counts = []
            fit(spec, t, steps=3, method=method, callback=lambda k, p, e: counts.append(HostReadCounter.reads))
            assert counts[0] == counts[-1], (spec.kind, method, counts)


def test_result_helpers():
    t = _target()
    res = fit(SPECS[1], t, steps=2)
    assert isinstance(res, FitResult) and res.method == "als" and res.seconds > 0
    ad = res.adapter()
    np.testing.assert_allclose(ad.delta(), res.delta())


def test_errors_name_the_argument():
    t = _target()
    with pytest.raises(TuckerPeftError, match=r"target: expected shape \(12, 9, 3, 3\), got \(3,\)"):
        fit(SPECS[0], np.zeros(3))
    with pytest.raises(TuckerPeftError, match="method: expected 'als' or 'adam'"):
        fit(SPECS[0], t, method="sgd")
    with pytest.raises(TuckerPeftError, match="steps: expected an int >= 0"):
        fit(SPECS[0], t, steps=-1)
    with pytest.raises(TuckerPeftError, match="scale"):
        fit(SPECS[0], t, scale=0)
    with pytest.raises(TuckerPeftError, match="target: expected a real floating dtype"):
        fit(SPECS[0], np.zeros(SPECS[0].shape, dtype=np.int64))
    with pytest.raises(TuckerPeftError, match="lr: expected a number > 0"):
        fit(SPECS[0], t, method="adam", lr=0)
    with pytest.raises(TuckerPeftError, match="init: expected"):
        fit(SPECS[0], t, init=3)


def test_budget_sweep_on_synthetic_update():
    # The extraction used in docs/example_extract.md, on a small synthetic "fine-tuning update".
    rng = np.random.default_rng(0)
    shape = (16, 8, 3, 3)
    t = np.einsum("abcd,ia,jb->ijcd", rng.standard_normal((4, 4, 3, 3)), rng.standard_normal((16, 4)),
                  rng.standard_normal((8, 4))) + 0.05 * rng.standard_normal(shape)
    budgets = [tp.LoRA(shape, r).num_params for r in (1, 2, 4)]
    rows = budget_sweep(t, budgets, steps=3)
    assert len(rows) == 12
    for row in rows:
        assert row.spec is not None and row.num_params <= row.budget
        assert 0 <= row.rel_error <= row.init_error + 1e-12 <= 1 + 1e-12
    lora = [r.rel_error for r in rows if r.kind == "lora"]
    assert lora == sorted(lora, reverse=True)
    # Tucker-2 has the structure of this update: at the largest budget it beats LoRA.
    best = {r.kind: r.rel_error for r in rows if r.budget == budgets[-1]}
    assert best["tucker2"] < best["lora"]
    tiny = budget_sweep(t, [5], kinds=("tucker", "lora"), steps=1)
    assert all(r.spec is None and math.isnan(r.rel_error) for r in tiny)
    assert set(rows[0].as_dict()) >= {"kind", "budget", "num_params", "rel_error"}


# -- numerical inputs ----------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("big", [1e200, 1e-200])
def test_huge_and_tiny_targets_are_rescaled_not_nan(spec, big):
    # Their squared norms over/underflow float64; the fit must match the fit of the unit-scale target.
    t = _target()
    ref = fit(spec, t, steps=3)
    res = fit(spec, t * big, steps=3)
    assert np.all(np.isfinite(res.rel_errors))
    np.testing.assert_allclose(res.rel_errors, ref.rel_errors, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_np(res.delta()) / big, to_np(ref.delta()), rtol=1e-8, atol=1e-10)


def test_huge_target_callback_sees_params_in_target_units():
    t = _target() * 1e200
    seen = []
    res = fit(SPECS[2], t, steps=2, callback=lambda k, p, e: seen.append(to_np(SPECS[2].reconstruct(p))))
    np.testing.assert_allclose(seen[-1], to_np(res.delta()), rtol=1e-12)
    assert np.abs(seen[-1]).max() > 1e199


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("method", ["als", "adam"])
def test_all_zero_target_gives_zero_delta(spec, method):
    res = fit(spec, np.zeros(spec.shape), steps=3, method=method)
    assert np.all(to_np(res.delta()) == 0) and np.all(res.rel_errors == 0)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_half_precision_targets_fit_in_float32_and_return_their_dtype(spec):
    t = _target()
    ref = fit(spec, t.astype(np.float32), steps=2)
    res = fit(spec, t.astype(np.float16), steps=2)
    assert all(v.dtype == np.float16 for v in res.params.values())
    # The fit is the float32 fit of the float16 values (within float16 rounding of the target).
    assert abs(res.final_error - ref.final_error) < 1e-2
    torch = pytest.importorskip("torch")
    res = fit(spec, torch.tensor(t, dtype=torch.bfloat16), steps=2)
    assert all(v.dtype == torch.bfloat16 for v in res.params.values())
    assert abs(res.final_error - ref.final_error) < 3e-2


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_half_precision_params_that_overflow_are_a_clear_error():
    # CP weights carry the whole norm: beyond float16's 65504 they cannot be returned.
    t = np.full((40, 40), 60000.0, dtype=np.float16)
    with pytest.raises(TuckerPeftError, match="overflow float16"):
        fit(tp.CP(t.shape, 1), t, steps=1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_target_is_refused(bad):
    t = _target()
    t[0, 0, 0, 0] = bad
    for spec in SPECS:
        with pytest.raises(TuckerPeftError, match="target: contains NaN or Inf"):
            fit(spec, t, steps=1, init="random")


@pytest.mark.parametrize("bad", [None, "2", True, float("nan"), [1.0]])
def test_scale_is_validated_in_one_place(bad):
    spec = SPECS[0]
    params = spec.init("random", seed=0)
    for call in (lambda: spec.reconstruct(params, bad), lambda: spec.vjp(params, np.ones(spec.shape), bad),
                 lambda: spec.apply(params, np.ones((2, 9, 3, 3)), bad), lambda: fit(spec, _target(), scale=bad),
                 lambda: tp.Adapter(spec, params, scale=bad)):
        with pytest.raises(TuckerPeftError, match=r"scale.*expected a finite"):
            call()


def test_numpy_scalar_scale_is_accepted_everywhere():
    spec = SPECS[0]
    params = spec.init("random", seed=0)
    s = np.float32(2.0)
    want = 2.0 * to_np(spec.reconstruct(params))
    np.testing.assert_allclose(to_np(spec.reconstruct(params, s)), want, rtol=1e-12)
    np.testing.assert_allclose(to_np(tp.Adapter(spec, params, scale=s).delta()), want, rtol=1e-12)
    res = fit(spec, _target(), scale=s, steps=1)
    assert res.scale == 2.0
    assert spec.init("hosvd", tensor=_target(), scale=s)["core"].shape == spec.param_shapes["core"]
