"""Optimizers against torch.optim on the same gradient trajectories, on every array library."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

from .conftest import to_np
from tucker_peft import TuckerPeftError
from tucker_peft.optim import SGD, Adam, AdamW, clip_grad_norm

torch = pytest.importorskip("torch")

SHAPES = {"core": (3, 2), "factor_0": (5, 3), "w": (4,)}


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    # Gradient of a quadratic with a curvature d > 0 and minimum c: g = d·(p − c).
    d = {k: rng.uniform(0.5, 2.0, s) for k, s in SHAPES.items()}
    c = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    return p0, d, c


def _ours(xp, opt, steps, seed=0):
    p0, d, c = _problem(seed)
    params = {k: xp.asarray(v) for k, v in p0.items()}
    dx = {k: xp.asarray(v) for k, v in d.items()}
    cx = {k: xp.asarray(v) for k, v in c.items()}
    traj = []
    for _ in range(steps):
        grads = {k: dx[k] * (params[k] - cx[k]) for k in params}
        params = opt.step(params, grads)
        traj.append({k: to_np(v) for k, v in params.items()})
    return traj, params


def _torch(make, steps, seed=0):
    p0, d, c = _problem(seed)
    ps = [torch.tensor(p0[k], requires_grad=True) for k in SHAPES]
    opt = make(ps)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        for p, k in zip(ps, SHAPES):
            p.grad = torch.as_tensor(d[k]) * (p.detach() - torch.as_tensor(c[k]))
        opt.step()
        traj.append({k: p.detach().numpy().copy() for p, k in zip(ps, SHAPES)})
    return traj


CASES = [
    ("sgd", lambda: SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("sgd-momentum", lambda: SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("sgd-dampening", lambda: SGD(lr=0.05, momentum=0.8, dampening=0.3),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3)),
    ("sgd-nesterov", lambda: SGD(lr=0.05, momentum=0.9, nesterov=True),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    ("adam", lambda: Adam(lr=0.05), lambda ps: torch.optim.Adam(ps, lr=0.05)),
    ("adam-l2", lambda: Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adam-amsgrad", lambda: Adam(lr=0.05, amsgrad=True), lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True)),
    ("adamw", lambda: AdamW(lr=0.05, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,ours,ref", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_optim(xp, name, ours, ref):
    steps = 25
    got, params = _ours(xp, ours(), steps)
    want = _torch(ref, steps)
    for k in SHAPES:
        np.testing.assert_allclose(got[-1][k], want[-1][k], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[3][k], want[3][k], rtol=1e-12, atol=1e-12)
    # The params stay in the input's library.
    assert type(params["core"]) is type(xp.asarray(np.zeros(1)))


def test_state_in_params_namespace(xp):
    opt = Adam(lr=0.1)
    _, params = _ours(xp, opt, 2)
    kind = type(params["core"])
    for st in opt.state.values():
        assert set(st) == {"exp_avg", "exp_avg_sq"}
        assert all(type(a) is kind for a in st.values())
    assert opt.t == 2


def test_float32_stays_float32():
    opt = Adam(lr=0.1)
    p = {"w": np.ones(3, dtype=np.float32)}
    out = opt.step(p, {"w": np.ones(3, dtype=np.float32)})
    assert out["w"].dtype == np.float32 and opt.state["w"]["exp_avg"].dtype == np.float32


def test_lr_schedule_and_lr_scale():
    # A schedule lr(t) and per-parameter multipliers against torch's LambdaLR and param groups.
    sched = lambda t: 0.1 / t  # noqa: E731
    opt = SGD(lr=sched, momentum=0.5)
    opt.lr_scale = {"core": 2.0}
    got, _ = _ours(npx, opt, 6)

    def make(ps):
        groups = [{"params": [p], "lr": 0.1 * (2.0 if k == "core" else 1.0)} for p, k in zip(ps, SHAPES)]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.5)

    p0, d, c = _problem()
    ps = [torch.tensor(p0[k], requires_grad=True) for k in SHAPES]
    topt = make(ps)
    lam = torch.optim.lr_scheduler.LambdaLR(topt, lambda e: 1.0 / (e + 1))
    for _ in range(6):
        for p, k in zip(ps, SHAPES):
            p.grad = torch.as_tensor(d[k]) * (p.detach() - torch.as_tensor(c[k]))
        topt.step()
        lam.step()
    for p, k in zip(ps, SHAPES):
        np.testing.assert_allclose(got[-1][k], p.detach().numpy(), rtol=1e-12)


def test_no_host_reads_in_step():
    from ._sync_guard import HostReadCounter, guarded

    for opt in (Adam(lr=0.1, amsgrad=True), AdamW(lr=0.1), SGD(lr=0.1, momentum=0.9, nesterov=True)):
        params = {k: guarded(np.ones(s)) for k, s in SHAPES.items()}
        HostReadCounter.reads = 0
        for _ in range(3):
            params = opt.step(params, {k: v * 0.5 for k, v in params.items()})
        assert HostReadCounter.reads == 0, type(opt).__name__
        assert isinstance(params["core"], HostReadCounter)


def test_clip_grad_norm_matches_torch(xp):
    rng = np.random.default_rng(3)
    g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    ts = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES.values()]
    for t, k in zip(ts, SHAPES):
        t.grad = torch.as_tensor(g[k]).clone()
    want_norm = torch.nn.utils.clip_grad_norm_(ts, 1.0)
    clipped, norm = clip_grad_norm({k: xp.asarray(v) for k, v in g.items()}, 1.0)
    np.testing.assert_allclose(float(to_np(norm)), float(want_norm), rtol=1e-12)
    for t, k in zip(ts, SHAPES):
        np.testing.assert_allclose(to_np(clipped[k]), t.grad.numpy(), rtol=1e-12)
    # Below the threshold nothing changes.
    same, _ = clip_grad_norm({k: xp.asarray(v) for k, v in g.items()}, 1e6)
    np.testing.assert_allclose(to_np(same["w"]), g["w"], rtol=1e-12)


def test_state_dict_round_trip_continues_identically():
    a = Adam(lr=0.05)
    _, params = _ours(npx, a, 3)
    b = Adam(lr=0.05)
    b.load_state_dict(a.state_dict(), params)
    g = {k: np.ones(s) for k, s in SHAPES.items()}
    pa, pb = a.step(params, g), b.step(params, g)
    assert b.t == a.t == 4
    for k in SHAPES:
        np.testing.assert_array_equal(pa[k], pb[k])


@pytest.mark.parametrize("make,match", [
    (lambda: Adam(lr=-1), "lr"),
    (lambda: Adam(betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda: Adam(betas=0.9), "betas"),
    (lambda: Adam(eps=0), "eps"),
    (lambda: SGD(lr=0.1, nesterov=True), "nesterov"),
    (lambda: SGD(lr=0.1, momentum=1.5), "momentum"),
    (lambda: AdamW(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters(make, match):
    with pytest.raises(TuckerPeftError, match=match):
        make()


def test_bad_grads_named():
    opt = Adam()
    p = {"a": np.zeros(3), "b": np.zeros(2)}
    with pytest.raises(TuckerPeftError, match=r"grads: expected the keys"):
        opt.step(p, {"a": np.zeros(3)})
    with pytest.raises(TuckerPeftError, match=r"grads\['b'\]: expected shape \(2,\)"):
        opt.step(p, {"a": np.zeros(3), "b": np.zeros(3)})
    opt.step(p, {"a": np.zeros(3), "b": np.zeros(2)})
    with pytest.raises(TuckerPeftError, match="holds state for"):
        opt.step({"a": np.zeros(3)}, {"a": np.zeros(3)})
    o = SGD(lr=lambda t: -1.0 if t == 2 else 0.1)
    o.step(p, p)
    with pytest.raises(TuckerPeftError, match=r"lr\(2\)"):
        o.step(p, p)
    assert o.t == 1
