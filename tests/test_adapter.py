"""Adapter: forward against dense products, backward against torch autograd and finite differences, checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tucker_peft as tp
from tucker_peft import ParamsError, TuckerPeftError
from tucker_peft.adapter import Adapter, StateDictError
from tucker_peft.optim import SGD, Adam

from .conftest import to_np

torch = pytest.importorskip("torch")

LETTERS = "abcdefgh"


def dense_delta(spec, p, lib=np):
    """ΔW written out by hand (no tucker_peft code), in NumPy or torch."""
    nd = spec.ndim
    if spec.kind in ("tucker", "tucker2"):
        out = p["core"]
        for n, r in enumerate(spec.ranks):
            if r is not None:
                # Mode-n product with factor_n: contract the rank index.
                sub = LETTERS[:nd]
                eq = f"{sub},{sub[n].upper()}{sub[n]}->{sub[:n]}{sub[n].upper()}{sub[n + 1:]}"
                out = lib.einsum(eq, out, p[f"factor_{n}"])
        return out
    if spec.kind == "cp":
        eq = "z," + ",".join(f"{c}z" for c in LETTERS[:nd]) + "->" + LETTERS[:nd]
        return lib.einsum(eq, p["weights"], *[p[f"factor_{n}"] for n in range(nd)])
    if spec.kind == "lora":
        return (p["B"] @ p["A"]).reshape(spec.shape)
    raise AssertionError(spec.kind)


SPECS = [
    tp.Tucker((6, 5, 3, 2), (3, 2, None, 2)),
    tp.Tucker2((6, 4, 3, 3), 2),
    tp.CP((6, 4, 3), 3),
    tp.LoRA((7, 5), 2),
    tp.Tucker((7, 5), (3, 2)),
]
IDS = ["tucker", "tucker2", "cp", "lora", "tucker-matrix"]


def _setup(spec, seed=0, batch=(4,)):
    rng = np.random.default_rng(seed)
    params = spec.init("random", seed=seed)
    W = rng.standard_normal(spec.shape)
    x = rng.standard_normal((*batch, *spec.shape[1:]))
    g = rng.standard_normal((*batch, spec.shape[0]))
    return params, W, x, g


def _dense_apply(spec, params, W, x, s):
    w = (W if W is not None else 0) + s * dense_delta(spec, params)
    n = int(np.prod(x.shape[: x.ndim - spec.ndim + 1]))
    y = x.reshape(n, -1) @ np.reshape(w, (spec.shape[0], -1)).T
    return y.reshape(*x.shape[: x.ndim - spec.ndim + 1], spec.shape[0])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("strategy", ["auto", "factorized", "rebuild"])
def test_apply_matches_dense(xp, spec, strategy):
    params, W, x, _ = _setup(spec, batch=(2, 3))
    ad = Adapter(spec, {k: xp.asarray(v) for k, v in params.items()}, scale=1.7, strategy=strategy,
                 base=xp.asarray(W))
    want = _dense_apply(spec, params, W, x, 1.7)
    np.testing.assert_allclose(to_np(ad.apply_linear(xp.asarray(x))), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_np(ad.apply(xp.asarray(x))), _dense_apply(spec, params, None, x, 1.7),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_np(ad.delta()), 1.7 * dense_delta(spec, params), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(ad.weight()), W + 1.7 * dense_delta(spec, params), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("strategy", ["factorized", "rebuild"])
@pytest.mark.parametrize("with_w", [True, False])
def test_backward_matches_torch_autograd(xp, spec, strategy, with_w):
    params, W, x, g = _setup(spec, seed=1, batch=(2, 3))
    s = -0.6
    ad = Adapter(spec, {k: xp.asarray(v) for k, v in params.items()}, scale=s, strategy=strategy)
    ad.apply(xp.asarray(x), xp.asarray(W) if with_w else None)
    grads, x_grad = ad.backward(xp.asarray(g), input_grad=True)

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    w = s * dense_delta(spec, tparams, torch) + (torch.as_tensor(W) if with_w else 0)
    y = tx.reshape(6, -1) @ w.reshape(spec.shape[0], -1).T
    loss = (y.reshape(2, 3, -1) * torch.as_tensor(g)).sum()
    loss.backward()
    for k, p in tparams.items():
        np.testing.assert_allclose(to_np(grads[k]), p.grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=k)
        np.testing.assert_allclose(to_np(ad.grads[k]), p.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(to_np(x_grad), tx.grad.numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_backward_finite_differences(spec):
    # L(p) = ½‖apply_linear(x) − t‖²: directional derivative along a random direction.
    params, W, x, t = _setup(spec, seed=2)
    ad = Adapter(spec, params, scale=0.8, base=W)
    y = ad.apply_linear(x)
    grads = ad.backward(y - t)

    def loss(p):
        return 0.5 * np.sum((_dense_apply(spec, p, W, x, 0.8) - t) ** 2)

    rng = np.random.default_rng(7)
    d = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    h = 1e-6
    fd = (loss({k: v + h * d[k] for k, v in params.items()}) - loss({k: v - h * d[k] for k, v in params.items()})) / (2 * h)
    analytic = sum(np.sum(grads[k] * d[k]) for k in params)
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_gradients_accumulate_and_step_consumes_them():
    spec = SPECS[0]
    params, W, x, g = _setup(spec)
    ad = Adapter(spec, params, scale=1.0, optimizer=SGD(lr=0.1))
    ad.apply(x)
    g1 = ad.backward(g)
    ad.apply(2 * x)
    g2 = ad.backward(g)
    for k in params:
        np.testing.assert_allclose(ad.grads[k], g1[k] + g2[k])
        np.testing.assert_allclose(g2[k], 2 * g1[k], rtol=1e-12)
    expected = {k: params[k] - 0.1 * 3 * g1[k] for k in params}
    new = ad.step()
    assert ad.grads is None
    for k in params:
        np.testing.assert_allclose(new[k], expected[k], rtol=1e-12)
        np.testing.assert_allclose(ad.params[k], expected[k], rtol=1e-12)


def test_backward_delta_is_the_vjp():
    spec = SPECS[2]
    params = spec.init("random", seed=3)
    ct = np.random.default_rng(3).standard_normal(spec.shape)
    ad = Adapter(spec, params, scale=2.0)
    got = ad.backward_delta(ct)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    (2.0 * dense_delta(spec, tparams, torch) * torch.as_tensor(ct)).sum().backward()
    for k, p in tparams.items():
        np.testing.assert_allclose(got[k], p.grad.numpy(), rtol=1e-10)


def test_training_loop_fits_a_linear_map(xp):
    # A linear layer whose target differs from the base by a rank-2 change is fitted with Adam.
    rng = np.random.default_rng(5)
    out, inp = 8, 6
    W = rng.standard_normal((out, inp))
    true = rng.standard_normal((out, 2)) @ rng.standard_normal((2, inp)) * 0.5
    x = rng.standard_normal((64, inp))
    t = x @ (W + true).T
    ad = Adapter(tp.LoRA((out, inp), 2), scale=1.0, base=xp.asarray(W), optimizer=Adam(lr=0.05), seed=0)
    xx, tt = xp.asarray(x), xp.asarray(t)
    first = None
    for _ in range(300):
        y = ad.apply_linear(xx)
        loss = float(to_np(xp.mean((y - tt) ** 2)))
        first = loss if first is None else first
        ad.backward((y - tt) * (2 / y.shape[0] / out))
        ad.step()
    assert loss < 1e-3 * first


def test_no_host_reads_in_a_training_step():
    from ._sync_guard import HostReadCounter, guarded

    spec = SPECS[0]
    params, W, x, g = _setup(spec)
    ad = Adapter(spec, {k: guarded(v) for k, v in params.items()}, base=guarded(W), optimizer=Adam(lr=0.01))
    gx, gg = guarded(x), guarded(g)
    HostReadCounter.reads = 0
    for _ in range(2):
        ad.apply_linear(gx)
        ad.backward(gg, input_grad=True)
        ad.step()
    assert HostReadCounter.reads == 0
    assert isinstance(ad.params["core"], HostReadCounter)


def test_errors_name_the_argument():
    spec = SPECS[0]
    params, W, x, g = _setup(spec)
    ad = Adapter(spec, params)
    with pytest.raises(TuckerPeftError, match="backward: expected a preceding apply"):
        ad.backward(g)
    with pytest.raises(ParamsError, match=r"x: expected shape \(\*batch, 5, 3, 2\)"):
        ad.apply(np.zeros((4, 5, 3)))
    with pytest.raises(ParamsError, match=r"W: expected shape"):
        ad.apply(x, np.zeros((2, 2)))
    with pytest.raises(TuckerPeftError, match="apply_linear needs a weight"):
        ad.apply_linear(x)
    ad.apply(x)
    with pytest.raises(ParamsError, match=r"grad_out: expected shape \(4, 6\)"):
        ad.backward(np.zeros((4, 5)))
    with pytest.raises(TuckerPeftError, match="step\\(\\) needs an optimizer"):
        ad.step()
    with pytest.raises(TuckerPeftError, match="strategy"):
        Adapter(spec, params, strategy="fast")
    with pytest.raises(ParamsError, match="base: expected shape"):
        Adapter(spec, params, base=np.zeros((3, 3)))
    with pytest.raises(TuckerPeftError, match="scale"):
        Adapter(spec, params, scale=float("nan"))
    with pytest.raises(TuckerPeftError, match="BackendMismatch|one array library"):
        Adapter(spec, params, base=torch.zeros(spec.shape, dtype=torch.float64))


# -- checkpoints ---------------------------------------------------------------

def _trained(spec, xp=None, steps=3, seed=0):
    params, W, x, g = _setup(spec, seed=seed)
    conv = (lambda a: a) if xp is None else xp.asarray
    ad = Adapter(spec, {k: conv(v) for k, v in params.items()}, scale=0.5, base=conv(W), optimizer=Adam(lr=0.01))
    for _ in range(steps):
        ad.apply_linear(conv(x))
        ad.backward(conv(g))
        ad.step()
    return ad, conv(x), conv(g)


def _snapshot(ad):
    return {k: to_np(v).copy() for k, v in ad.params.items()}, {
        k: {s: to_np(a).copy() for s, a in st.items()} for k, st in ad.optimizer.state.items()}, ad.optimizer.t


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_save_load_round_trip_resumes_training_exactly(xp, spec, tmp_path):
    ad, x, g = _trained(spec, xp)
    path = tmp_path / "ad.safetensors"
    ad.save(path)
    # Resume from the file: the next step must equal the uninterrupted one.
    fresh = Adapter(spec, spec.init("zero", like=x, seed=9), scale=0.5, base=ad.base, optimizer=Adam(lr=0.01))
    fresh.load_state_dict(path)
    assert fresh.optimizer.t == ad.optimizer.t == 3
    for a in (ad, fresh):
        a.apply_linear(x)
        a.backward(g)
        a.step()
    for k in ad.params:
        np.testing.assert_array_equal(to_np(fresh.params[k]), to_np(ad.params[k]))
        assert type(fresh.params[k]) is type(ad.params[k])
    # Adapter.load rebuilds spec and scale from the metadata.
    ad.save(path)
    loaded = Adapter.load(path, like=x, optimizer=Adam(lr=0.01))
    assert loaded.spec == spec and loaded.scale == 0.5 and loaded.optimizer.t == 4
    np.testing.assert_array_equal(to_np(loaded.delta()), to_np(ad.delta()))


def test_state_dict_is_plain_numpy_for_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    ad, _, _ = _trained(SPECS[1])
    sd = ad.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert set(sd) == {f"params.{k}" for k in ad.params} | {"optim.t"} | {
        f"optim.{s}.{k}" for k in ad.params for s in ("exp_avg", "exp_avg_sq")}
    save_file(sd, tmp_path / "x.safetensors")
    other = Adapter(SPECS[1], scale=0.5, optimizer=Adam(lr=0.01), seed=1)
    other.load_state_dict(load_file(tmp_path / "x.safetensors"))
    for k in ad.params:
        np.testing.assert_array_equal(other.params[k], ad.params[k])


def test_load_casts_to_the_adapter_dtype_and_library(tmp_path):
    ad, _, _ = _trained(SPECS[3])
    ad.save(tmp_path / "a.safetensors")
    like = torch.zeros(1, dtype=torch.float32)
    t = Adapter.load(tmp_path / "a.safetensors", like=like)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in t.params.values())
    np.testing.assert_allclose(to_np(t.delta()), ad.delta(), rtol=1e-5, atol=1e-6)


def _expect_unchanged(ad, before):
    after = _snapshot(ad)
    for k in before[0]:
        np.testing.assert_array_equal(after[0][k], before[0][k])
    assert after[2] == before[2]
    for k in before[1]:
        for s in before[1][k]:
            np.testing.assert_array_equal(after[1][k][s], before[1][k][s])


def test_corrupted_file_leaves_the_adapter_unchanged(tmp_path):
    ad, _, _ = _trained(SPECS[0])
    path = tmp_path / "ad.safetensors"
    ad.save(path)
    raw = path.read_bytes()
    before = _snapshot(ad)
    cases = {
        "truncated": raw[: len(raw) // 2],
        "garbage": b"\x00\x01not a safetensors file",
        "bad-header": (10**12).to_bytes(8, "little") + raw[8:],
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(StateDictError, match="expected a readable safetensors file"):
            ad.load_state_dict(bad)
        _expect_unchanged(ad, before)
    with pytest.raises(StateDictError, match="does not exist"):
        ad.load_state_dict(tmp_path / "missing.safetensors")
    _expect_unchanged(ad, before)


def test_invalid_states_are_rejected_before_any_change(tmp_path):
    from safetensors.numpy import save_file

    ad, _, _ = _trained(SPECS[0])
    before = _snapshot(ad)
    good = ad.state_dict()
    k0 = "params.core"

    def variant(**changes):
        sd = dict(good)
        for k, v in changes.items():
            if v is None:
                sd.pop(k)
            else:
                sd[k] = v
        return sd

    bad_cases = [
        (variant(**{k0: None}), r"missing \['params.core'\]"),
        (variant(**{k0: np.zeros((1, 2))}), r"state\['params.core'\]: expected shape \(3, 2, 3, 2\), got \(1, 2\)"),
        (variant(**{k0: np.full(good[k0].shape, np.nan)}), "NaN or Inf"),
        (variant(**{k0: np.zeros(good[k0].shape, dtype=np.int64)}), "floating dtype"),
        (variant(**{"params.extra": np.zeros(1)}), r"unexpected \['params.extra'\]"),
        (variant(**{"optim.exp_avg.core": np.zeros((2, 2))}), r"optimizer state\['core'\]\['exp_avg'\]: expected shape"),
        (variant(**{"optim.exp_avg.core": None}), r"expected slots"),
        (variant(**{"optim.t": None}), "optim.t"),
        (variant(**{"optim.t": np.zeros(2, dtype=np.int64)}), "0-d int"),
    ]
    for sd, match in bad_cases:
        with pytest.raises(StateDictError, match=match):
            ad.load_state_dict(sd)
        _expect_unchanged(ad, before)
    # A file holding another spec.
    other = Adapter(tp.Tucker(SPECS[0].shape, 1), seed=0)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(StateDictError, match="file holds Tucker"):
        ad.load_state_dict(tmp_path / "other.safetensors")
    _expect_unchanged(ad, before)
    # Optimizer entries into an adapter without an optimizer: only with strict=False.
    plain = Adapter(SPECS[0], seed=0)
    with pytest.raises(StateDictError, match="no optimizer"):
        plain.load_state_dict(good)
    plain.load_state_dict(good, strict=False)
    np.testing.assert_array_equal(plain.params["core"], good["params.core"])
    save_file({"x": np.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(StateDictError, match="expected metadata format"):
        Adapter.load(tmp_path / "foreign.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    ad, _, _ = _trained(SPECS[3])
    path = tmp_path / "ad.safetensors"
    ad.save(path)
    old = path.read_bytes()

    def boom(fd):  # the new bytes are written, then syncing them fails
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    ad.step({k: np.ones(v.shape) for k, v in ad.params.items()})
    with pytest.raises(OSError, match="disk full"):
        ad.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ad.safetensors"]


def test_map_arrays_shares_memory_with_torch():
    from tucker_peft.backends.cupy import adapter_to_torch, shares_memory

    ad, x, g = _trained(SPECS[0])
    t = adapter_to_torch(ad)
    for k in ad.params:
        assert isinstance(t.params[k], torch.Tensor) and shares_memory(t.params[k], ad.params[k])
    for k, st in ad.optimizer.state.items():
        for s, a in st.items():
            assert shares_memory(t.optimizer.state[k][s], a)
    assert t.optimizer is not ad.optimizer and t.optimizer.t == ad.optimizer.t
    # Both continue identically, one in torch, one in NumPy.
    t.apply_linear(torch.as_tensor(x))
    t.backward(torch.as_tensor(g))
    t.step()
    ad.apply_linear(x)
    ad.backward(g)
    ad.step()
    for k in ad.params:
        np.testing.assert_allclose(to_np(t.params[k]), ad.params[k], rtol=1e-12, atol=1e-14)
