"""tucker_peft: parameter-efficient fine-tuning with tensor-decomposed weight changes.

The core is backend-agnostic: every function dispatches on the arrays it is
given (NumPy, PyTorch, CuPy, array-api-strict...). Importing it never imports
torch or cupy; framework bindings live in :mod:`tucker_peft.backends`.
"""

from . import ranks
from ._base import Cost, Parametrization, kinds, lookup, parametrization, register
from ._decomp import hooi, hosvd, multilinear_project, parafac
from ._errors import BackendMismatchError, InitError, ParamsError, RankError, TuckerPeftError
from ._version import __version__
from .cp import CP
from .lora import LoRA
from .loha import LoHa
from .lokr import LoKr
from .tt import TT
from .tucker import Tucker, Tucker2
from . import optim
from .adapter import Adapter, StateDictError
from .fitting import FitResult, budget_sweep, fit

__all__ = [
    "__version__",
    "Parametrization",
    "Cost",
    "Tucker",
    "Tucker2",
    "CP",
    "LoRA",
    "TT",
    "LoKr",
    "LoHa",
    "parametrization",
    "register",
    "kinds",
    "lookup",
    "hosvd",
    "hooi",
    "parafac",
    "multilinear_project",
    "ranks",
    "TuckerPeftError",
    "RankError",
    "ParamsError",
    "BackendMismatchError",
    "InitError",
    "optim",
    "Adapter",
    "StateDictError",
    "fit",
    "FitResult",
    "budget_sweep",
]
