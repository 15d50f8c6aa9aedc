"""Contraction planning has a bounded cost, and specs cap their number of modes.

The time bound here is a cost bound against exponential blow-up (a 14-mode
Tucker took 15 s to plan, a 12-mode CP 7.5 s), not a speed benchmark: typical
plans take milliseconds and the worst accepted shape a few tenths of a second.
"""

from __future__ import annotations

import math
import time

import opt_einsum
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import _planner
from tucker_peft._base import MAX_MODES, Parametrization

BOUND_S = 1.0


def _clear_plans() -> None:
    _planner.schedule.cache_clear()
    _planner._path_info.cache_clear()
    Parametrization.cost.cache_clear()


def _plan(spec: Parametrization, n: int) -> None:
    """Everything a forward/backward of ``spec`` plans: both einsums and the cost model."""
    spec.cost(n)
    _planner.schedule(spec._recon_eq, spec._views)
    _planner.schedule(spec._apply_eq, ((n, *spec.shape[1:]),) + spec._views)


def _planning_seconds(spec: Parametrization, n: int) -> float:
    """CPU seconds of planning from empty caches; the best of up to 3 tries.

    CPU time of this process (planning is single-threaded Python), not wall
    time: on a shared 2-core machine other processes can stretch wall time
    twentyfold, while the cost bound is about the work done.
    """
    best = math.inf
    for _ in range(3):
        _clear_plans()
        t0 = time.process_time()
        _plan(spec, n)
        best = min(best, time.process_time() - t0)
        if best < BOUND_S:
            break
    return best


@st.composite
def specs(draw, max_modes: int = MAX_MODES):
    nd = draw(st.integers(1, max_modes))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 7, 16, 64, 300]), min_size=nd, max_size=nd)))
    kind = draw(st.sampled_from(["tucker", "tucker2", "cp", "lora"]))
    if kind == "tucker":
        ranks = tuple(draw(st.one_of(st.none(), st.integers(1, d))) for d in shape)
        return tp.Tucker(shape, ranks)
    if kind == "tucker2":
        return tp.Tucker2(shape, draw(st.integers(1, 64)))
    if kind == "cp":
        return tp.CP(shape, draw(st.integers(1, min(64, tp.cp.max_cp_rank(shape)))))
    return tp.LoRA(shape, draw(st.integers(1, min(shape[0], math.prod(shape[1:])))))


@settings(max_examples=30)
@given(spec=specs(), n=st.sampled_from([1, 8, 4096]))
def test_planning_any_accepted_shape_is_bounded(spec, n):
    assert _planning_seconds(spec, n) < BOUND_S, spec


@pytest.mark.parametrize("kind,nd", [("tucker", 12), ("cp", 12), ("tucker", 7), ("cp", 7), ("cp", 6), ("tucker", 6)])
def test_planning_worst_mode_counts_are_bounded(kind, nd):
    # The reported blow-ups (12 modes) and the largest exhaustive searches (6-7 modes, 7-9 operands).
    shape = (2, 2, 300, 300, 7, 300, 2, 3, 2, 2, 3, 2)[:nd]
    spec = tp.Tucker(shape, 2) if kind == "tucker" else tp.CP(shape, 8)
    assert _planning_seconds(spec, 1) < BOUND_S


def test_many_modes_need_explicit_max_modes_and_then_plan_greedily():
    with pytest.raises(tp.TuckerPeftError, match=r"at most 12 modes, got 13.*max_modes=13"):
        tp.Tucker((2,) * 13, 1)
    for kind in ("tucker2", "cp", "lora"):
        with pytest.raises(tp.TuckerPeftError, match="at most 12 modes"):
            tp.parametrization(kind, (2,) * 20, **({"ranks": 1} if kind == "tucker2" else {"rank": 1}))
    with pytest.raises(tp.TuckerPeftError, match="max_modes"):
        tp.Tucker((2, 2), 1, max_modes=0)
    spec = tp.Tucker((2,) * 20, 1, max_modes=20)
    assert spec == tp.Tucker((2,) * 20, 1, max_modes=30)  # not part of the identity
    assert _planning_seconds(spec, 4) < BOUND_S
    assert _planning_seconds(tp.CP((2,) * 20, 2, max_modes=20), 4) < BOUND_S


def test_max_modes_round_trips_through_json_and_is_omitted_by_default():
    from tucker_peft.adapter import spec_from_json, spec_to_json

    assert "max_modes" not in spec_to_json(tp.Tucker((4, 4), 2))
    big = tp.CP((2,) * 14, 2, max_modes=14)
    assert spec_from_json(spec_to_json(big)) == big


def test_many_mode_plan_is_still_correct():
    import numpy as np

    spec = tp.Tucker((2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1), 1, max_modes=16)
    params = spec.init("random", seed=0)
    ops = [params["core"]] + [params[f"factor_{n}"] for n in range(spec.ndim)]
    want = np.einsum(spec._recon_eq, *ops, optimize="greedy")
    np.testing.assert_allclose(spec.reconstruct(params), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", [
    tp.Tucker((256, 256, 3, 3), (32, 32, 3, 3)), tp.Tucker((1024, 512, 3, 3, 3), (64, 64, 3, 3, 3)),
    tp.CP((64, 32, 3, 3, 3), 40), tp.Tucker((768, 1, 16, 64), (15, 1, 13, 6)), tp.CP((16, 7, 1024, 5, 3), 40),
    tp.Tucker2((128, 1, 4096, 3), 14), tp.LoRA((64, 32, 3, 3), 8),
])
@pytest.mark.parametrize("n", [1, 8, 4096])
def test_up_to_five_modes_plans_stay_flop_optimal(spec, n):
    # Shapes where opt_einsum's 'dp' and 'greedy' cost more FLOPs than its 'optimal' search.
    for eq, shapes in ((spec._recon_eq, spec._views), (spec._apply_eq, ((n, *spec.shape[1:]),) + spec._views)):
        best = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="optimal")[1].opt_cost
        assert _planner.plan_cost(eq, shapes) == int(best)
