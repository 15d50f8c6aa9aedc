"""Rank selection: budgets never exceeded, maximal within their family."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tucker_peft as tp
from tucker_peft import testing as tpst

shapes = tpst.shapes(min_ndim=1, max_ndim=5, max_side=8, max_size=5000)
constraints = st.sampled_from([
    ("tucker", {}), ("tucker", {"split": "proportional"}), ("tucker", {"kernel": "full"}),
    ("tucker", {"kernel": "none"}), ("tucker", {"fixed": {0: None}}), ("tucker2", {}),
    ("tucker2", {"split": "proportional"}), ("cp", {}), ("lora", {}),
])


@given(shape=shapes, kc=constraints, budget=st.integers(1, 20_000))
def test_for_budget_fits_and_is_maximal(shape, kc, budget):
    kind, c = kc
    cls = tp._base.lookup(kind)
    f, t_max = cls.budget_family(shape, **c)
    if f(1).num_params > budget:
        with pytest.raises(tp.RankError, match="needs at least"):
            tp.ranks.for_budget(kind, shape, budget, **c)
        return
    spec = tp.ranks.for_budget(kind, shape, budget, **c)
    assert spec.num_params <= budget
    assert spec.shape == shape and spec.kind == kind
    # Maximal: no member of the family fits the budget with more parameters.
    best = max(f(t).num_params for t in range(1, t_max + 1) if f(t).num_params <= budget)
    assert spec.num_params == best


@given(shape=tpst.shapes(min_ndim=2, max_ndim=3, max_side=5), budget=st.integers(1, 400))
def test_equal_split_against_brute_force(shape, budget):
    """Among Tucker specs with one shared rank r (clipped), for_budget finds the largest that fits."""
    fits = [tp.Tucker(shape, r) for r in range(1, max(shape) + 1) if tp.Tucker(shape, r).num_params <= budget]
    if not fits:
        return
    assert tp.ranks.for_budget("tucker", shape, budget).num_params == max(s.num_params for s in fits)


def test_proportional_split_and_kernel_modes():
    spec = tp.ranks.for_budget("tucker", (256, 64, 3, 3), 20_000, split="proportional", kernel="full")
    r0, r1, k1, k2 = spec.ranks
    assert (k1, k2) == (3, 3) and r0 >= 3 * r1
    t2 = tp.ranks.for_budget("tucker", (256, 64, 3, 3), 20_000, kernel="none")
    assert t2.ranks[2:] == (None, None)


@given(shape=tpst.shapes(min_ndim=2, max_ndim=4, min_side=2, max_side=8), r=st.integers(1, 4), kind=st.sampled_from(["tucker", "cp", "tucker2"]))
def test_match_is_closest_not_above(shape, r, kind):
    lora = tp.LoRA(shape, min(r, shape[0], math.prod(shape[1:])))
    try:
        spec = tp.ranks.match(lora, kind)
    except tp.RankError:
        return
    assert spec.num_params <= lora.num_params


def test_match_example_from_docs():
    lora = tp.LoRA((64, 32, 3, 3), 8)
    t = tp.ranks.match(lora, "tucker")
    assert t.num_params <= lora.num_params < tp.Tucker((64, 32, 3, 3), t.ranks[0] + 1).num_params


def test_budget_errors():
    with pytest.raises(tp.RankError, match=r"needs at least 9 parameters.*got budget 5"):
        tp.ranks.for_budget("lora", (4, 5), 5)
    with pytest.raises(tp.TuckerPeftError, match="budget: expected an int >= 1"):
        tp.ranks.for_budget("lora", (4, 5), 0)
    with pytest.raises(tp.TuckerPeftError, match="budget: expected an int >= 1"):
        tp.ranks.for_budget("lora", (4, 5), 10.5)
    with pytest.raises(tp.TuckerPeftError, match="unexpected constraints for kind 'cp'"):
        tp.ranks.for_budget("cp", (4, 5), 100, split="equal")
    with pytest.raises(tp.TuckerPeftError, match="split: expected 'equal' or 'proportional'"):
        tp.ranks.for_budget("tucker", (4, 5), 100, split="even")
    with pytest.raises(tp.TuckerPeftError, match="kind: expected one of"):
        tp.ranks.for_budget("nope", (4, 5), 100)
    with pytest.raises(tp.TuckerPeftError, match="spec: expected a Parametrization"):
        tp.ranks.match((4, 5), "cp")


def test_fixed_modes_are_respected():
    for r0, r1 in itertools.product((None, 2), (None, 3)):
        spec = tp.ranks.for_budget("tucker", (8, 6, 5), 10_000, fixed={0: r0, 1: r1})
        assert spec.ranks[:2] == (r0, r1)
