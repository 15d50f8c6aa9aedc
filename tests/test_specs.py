"""Spec construction, validation and the error messages users see."""

import math

import numpy as np
import pytest

import tucker_peft as tp
from tucker_peft import BackendMismatchError, InitError, ParamsError, RankError, TuckerPeftError


def test_errors_share_one_base_that_is_a_valueerror():
    for e in (RankError, ParamsError, BackendMismatchError, InitError):
        assert issubclass(e, TuckerPeftError)
    assert issubclass(TuckerPeftError, ValueError)


def test_broadcast_int_is_clipped_per_mode():
    assert tp.Tucker((8, 1, 7, 7), 8).ranks == (8, 1, 7, 7)
    assert tp.Tucker((64, 32, 3, 3), 100).ranks == (64, 32, 3, 3)


def test_explicit_rank_out_of_range_names_mode_and_sizes():
    with pytest.raises(RankError, match=r"ranks\[1\] \(mode of size 4\).*\[1, 4\].*got 5"):
        tp.Tucker((8, 4, 3), (2, 5, 1))
    with pytest.raises(RankError, match=r"got 0"):
        tp.Tucker((8, 4, 3), (2, 0, 1))


def test_wrong_number_of_ranks():
    with pytest.raises(RankError, match=r"expected 3 values .*\(8, 4, 3\).*got 2"):
        tp.Tucker((8, 4, 3), (2, 2))


@pytest.mark.parametrize("bad", [2.0, 2.5, "2", True, [2.0, 1, 1]])
def test_non_integer_rank_rejected(bad):
    with pytest.raises(RankError, match="expected"):
        tp.Tucker((8, 4, 3), bad)


def test_numpy_integer_ranks_accepted():
    assert tp.Tucker((8, 4), (np.int64(3), np.int32(2))).ranks == (3, 2)


def test_cp_and_lora_rank_bounds():
    with pytest.raises(RankError, match=r"\[1, 12\]"):
        tp.CP((4, 3, 4), 13)  # max CP rank is 48 / 4
    assert tp.CP((4, 3, 4), 12).rank == 12
    with pytest.raises(RankError, match=r"\[1, 6\]"):
        tp.LoRA((6, 4, 3), 7)


@pytest.mark.parametrize("shape", [(), (3, 0), (3, -1), (2.5,), "ab"])
def test_bad_shapes(shape):
    with pytest.raises(TuckerPeftError, match="shape"):
        tp.Tucker(shape, 1)


def test_specs_are_immutable_and_hashable():
    s = tp.Tucker((4, 4), 2)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        s.ranks = (1, 1)
    assert {s: 1}[tp.Tucker((4, 4), (2, 2))] == 1


def test_tucker2_is_tucker_on_channel_modes():
    t2 = tp.Tucker2((16, 8, 3, 3), 4)
    assert t2.ranks == (4, 4, None, None)
    assert t2.param_shapes == tp.Tucker((16, 8, 3, 3), (4, 4, None, None)).param_shapes
    assert tp.Tucker2((16, 8, 3, 3), (4, 2)).ranks == (4, 2, None, None)


def test_num_params_formulas():
    t = tp.Tucker((16, 8, 3, 3), (4, 2, 3, None))
    assert t.num_params == 4 * 2 * 3 * 3 + 16 * 4 + 8 * 2 + 3 * 3
    assert tp.CP((16, 8, 3, 3), 5).num_params == 5 * (1 + 16 + 8 + 3 + 3)
    assert tp.LoRA((16, 8, 3, 3), 5).num_params == 5 * (16 + 72)


def test_registry_by_name_and_unknown_kind_lists_valid():
    assert tp.parametrization("TUCKER", (4, 4), ranks=2) == tp.Tucker((4, 4), 2)
    assert tp.parametrization("cp", (4, 4), rank=2) == tp.CP((4, 4), 2)
    assert {"tucker", "tucker2", "cp", "lora"} <= set(tp.kinds())
    with pytest.raises(TuckerPeftError, match=r"expected one of \[.*'cp'.*'lora'.*'tt'.*'tucker'.*got 'nope'"):
        tp.parametrization("nope", (4, 4))


def test_third_party_kind_can_register_and_join_budgets():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Diag(tp.Parametrization):
        """ΔW = diag(d) on a square matrix."""

        kind = "diag_test"

        def __post_init__(self):
            assert len(self.shape) == 2 and self.shape[0] == self.shape[1]

        @property
        def param_shapes(self):
            return {"d": (self.shape[0],)}

        def _terms(self):
            return (("d", (self.shape[0],), "a"), ("eye", (self.shape[0], self.shape[0]), "ab"))

        def _init(self, method, ctx, rng, tensor, scale, options):
            return {"d": ctx.asarray(rng.standard_normal(self.shape[0]))}

        @classmethod
        def budget_family(cls, shape, **c):
            return (lambda t: cls(tuple(shape))), 1

    tp.register("diag_test", Diag)
    try:
        with pytest.raises(TuckerPeftError, match="already registered"):
            tp.register("diag_test", tp.Tucker)
        assert tp.ranks.for_budget("diag_test", (5, 5), 10) == Diag((5, 5))
    finally:
        tp._base._REGISTRY.pop("diag_test")


def test_params_missing_extra_and_wrong_shape():
    s = tp.Tucker((6, 5, 3), (2, 2, None))
    p = s.init("random", seed=0)
    bad = dict(p)
    del bad["factor_1"]
    bad["factor_9"] = p["factor_0"]
    with pytest.raises(ParamsError, match=r"missing \['factor_1'\].*unexpected \['factor_9'\]"):
        s.reconstruct(bad)
    bad = dict(p, core=np.zeros((2, 2, 2)))
    with pytest.raises(ParamsError, match=r"params\['core'\]: expected shape \(2, 2, 3\), got \(2, 2, 2\)"):
        s.reconstruct(bad)
    with pytest.raises(ParamsError, match=r"cotangent: expected shape \(6, 5, 3\)"):
        s.vjp(p, np.zeros((6, 5)))
    with pytest.raises(ParamsError, match="expected a dict"):
        s.reconstruct([1, 2])


def test_mixed_libraries_rejected_with_names():
    torch = pytest.importorskip("torch")
    s = tp.LoRA((6, 4), 2)
    p = s.init("random", seed=0)
    p["A"] = torch.asarray(p["A"])
    with pytest.raises(BackendMismatchError, match=r"B: numpy.*A: torch"):
        s.reconstruct(p)
    with pytest.raises(BackendMismatchError):
        s.init("hosvd", tensor=np.ones((6, 4)), like=torch.ones(1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_init_tensor_rejected(bad):
    w = np.ones((4, 3, 2))
    w[1, 2, 0] = bad
    for spec in (tp.Tucker(w.shape, 2), tp.CP(w.shape, 2), tp.LoRA(w.shape, 2)):
        with pytest.raises(InitError, match="NaN or Inf"):
            spec.init("hosvd", tensor=w)


def test_init_method_errors():
    s = tp.Tucker((4, 3), 2)
    with pytest.raises(InitError, match=r"expected one of \['hooi', 'hosvd', 'random', 'zero'\].*got 'pissa'"):
        s.init("pissa")
    with pytest.raises(InitError, match="needs tensor="):
        s.init("hosvd")
    with pytest.raises(InitError, match=r"tensor: expected shape \(4, 3\), got \(3, 4\)"):
        s.init("hosvd", tensor=np.ones((3, 4)))
    with pytest.raises(InitError, match="unexpected options"):
        s.init("zero", cores="zero")
    with pytest.raises(InitError, match="core: expected 'project' or 'zero'"):
        s.init("hosvd", tensor=np.ones((4, 3)), core="half")
    with pytest.raises(InitError, match="scale"):
        s.init("hosvd", tensor=np.ones((4, 3)), scale=0.0)
    with pytest.raises(TuckerPeftError, match="dtype"):
        s.init("zero", dtype="int32")


def test_seed_reproducible_and_distinct():
    s = tp.CP((5, 4, 3), 3)
    a, b, c = (s.init("zero", seed=k) for k in (1, 1, 2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["factor_0"], c["factor_0"])


def test_like_sets_library_device_dtype():
    torch = pytest.importorskip("torch")
    like = torch.zeros(1, dtype=torch.float32)
    p = tp.Tucker((5, 4), 2).init("zero", like=like, seed=0)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in p.values())
    p = tp.Tucker((5, 4), 2).init("zero", like=like, dtype="float64", seed=0)
    assert all(v.dtype == torch.float64 for v in p.values())
    assert all(v.dtype == np.float64 for v in tp.Tucker((5, 4), 2).init("zero").values())


def test_cost_formulas():
    lora = tp.LoRA((64, 32, 3, 3), 8)
    assert lora.cost().reconstruct == 2 * 64 * 8 * 288
    t = tp.Tucker((256, 256, 3, 3), (32, 32, 3, 3))
    # The naive mode-0-first chain costs more than the planned order.
    naive, dims = 0, [32, 32, 3, 3]
    for n, size in enumerate((256, 256, 3, 3)):
        naive += 2 * math.prod(dims) * size
        dims[n] = size
    assert t.cost().reconstruct < naive
    c = t.cost(n=10_000)
    assert c.apply_rebuild == c.reconstruct + 2 * 10_000 * 256 * 256 * 9
    assert c.best_apply == "factorized"
    assert tp.LoRA((8, 8), 8).cost(n=1000).best_apply == "rebuild"


def test_einsum_with_an_index_summed_inside_one_operand_is_rejected():
    from tucker_peft._planner import contract_vjp

    a = np.ones((3, 4, 2))
    with pytest.raises(TuckerPeftError, match=r"index 'z' of term 'abz' is summed without meeting another operand"):
        contract_vjp("abz->ab", [a], np.ones((3, 4)))


def test_vjp_cost_is_about_two_largest_products():
    t = tp.Tucker((1024, 512, 3, 3, 3), (64, 64, 3, 3, 3))
    largest = 2 * 1024 * 512 * 27 * 64
    c = t.cost()
    assert largest <= c.reconstruct < 1.2 * largest
    assert 2 * largest <= c.vjp < 2.5 * largest
