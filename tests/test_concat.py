"""Each kind's ``concat``: one spec whose ΔW is the weighted sum of several, exactly, on any array-API library."""

from __future__ import annotations

import numpy as np
import pytest

import tucker_peft as tp

xps = pytest.importorskip("array_api_strict")

CASES = [  # (kind, shape, ranks of each adapter): ranks that add up within the modes, and past them (folded)
    ("tucker", (6, 5, 3, 3), [(2, 2, 1, 3), (3, 1, None, 2)]),
    ("tucker", (4, 1, 3), [(3, 1, 2), (2, 1, 2)]),
    ("tucker2", (6, 4, 3, 3), [(2, 1), (3, 3)]),
    ("cp", (6, 5, 3), [2, 4]),
    ("cp", (3, 6), [2, 2]),          # 4 > the largest CP rank 3: written as fibres
    ("lora", (6, 5, 3), [1, 2]),
    ("lora", (3, 7), [2, 3]),        # 5 > min(3, 7): kept at rank 3
]


def _spec(kind, shape, r):
    key = "ranks" if kind in ("tucker", "tucker2") else "rank"
    return tp.parametrization(kind, shape, **{key: r})


@pytest.mark.parametrize("kind, shape, ranks", CASES)
def test_concat_is_the_weighted_sum(kind, shape, ranks):
    specs = [_spec(kind, shape, r) for r in ranks]
    params = [s.init("random", like=np.zeros(shape), seed=i) for i, s in enumerate(specs)]
    weights = [0.7, -1.3]
    want = sum(w * s.reconstruct(p) for s, p, w in zip(specs, params, weights))
    strict = [{k: xps.asarray(v) for k, v in p.items()} for p in params]
    spec, got = type(specs[0]).concat(specs, strict, weights)
    assert type(spec) is type(specs[0]) and spec.shape == shape
    assert {k: tuple(v.shape) for k, v in got.items()} == spec.param_shapes
    np.testing.assert_allclose(np.asarray(spec.reconstruct(got)), want, rtol=1e-12, atol=1e-12)
