"""Compatibility re-export of :mod:`._namespace` and :mod:`._planner` (import from those)."""

from ._namespace import ArrayContext, einsum_backend, library_of, namespace, to_numpy
from ._planner import Schedule, contract, contract_vjp, plan_cost, schedule, vjp_cost

__all__ = [
    "namespace",
    "library_of",
    "einsum_backend",
    "schedule",
    "Schedule",
    "contract",
    "contract_vjp",
    "plan_cost",
    "vjp_cost",
    "ArrayContext",
    "to_numpy",
]
