"""The task protocol of :func:`tucker_peft.compare.run`: what a model, its data and its metric must provide.

A task is an object with the attributes and methods of :class:`Task`;
subclassing :class:`Task` gives the defaults (settings, a seeded batch
order, a frozen-stem cache helper). Nothing here imports torch.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from .._errors import TuckerPeftError

__all__ = ["Task", "check_task", "metric_value", "build_model", "stack_sets", "DEFAULT_STACK_SET"]

#: The name a task's single stack (``{group: regex}``) goes by: variants ``tucker@layers``, ``--stack layers``.
DEFAULT_STACK_SET = "layers"


class Task:
    """Base class of a fine-tuning task for :func:`tucker_peft.compare.run`.

    A subclass defines the model, the data and the metric; the runner owns the
    protocol (adapters at equal budgets, optimiser, learning-rate selection on
    ``'val'``, test scoring, statistics). Everything a run does with the task:

    1. ``prepare()`` once (load data, cache frozen activations);
    2. per run: ``build_model(seed)``, inject the kind's adapters into the
       modules matching ``target_modules`` (plus the parameters matching
       ``trainable``, the same for every kind), then ``steps`` AdamW steps on
       ``loss(model, batch)`` for the batches of ``train_batches(seed)``;
    3. ``evaluate(model, 'val')`` for every run, ``evaluate(model, 'test')``
       only for each kind's selected learning rate.

    Attributes
    ----------
    name : str
        Label in the results (default: the class name).
    description : str
        One line for the report.
    metric : str
        Name of the number :meth:`evaluate` returns.
    higher_is_better : bool
    target_modules : str or list of str
        The modules to adapt: a regex (``re.fullmatch`` on module names) or a
        list of names, as :class:`~tucker_peft.backends.torch.AdapterConfig`.
    trainable : str or list of str or None
        Extra parameters every kind trains alike (a fresh head), as
        ``AdapterConfig.trainable``.
    stack : dict, optional
        Cross-layer adapters (``AdapterConfig.stack``): ``{group: regex}``
        with named captures (``(?P<layer>\\d+)``), one set called
        ``'layers'``; or named sets, ``{set name: {group: regex}}``. Unused
        unless a run asks for it: ``run(stack='layers')`` (``--stack
        layers``) adds, for each kind K, the variant ``K@layers``, the kind on
        the stacked groups (targets in no group stay per layer).
    steps, batch_size : int
        Defaults of :func:`~tucker_peft.compare.run`'s ``steps`` and of the
        batch size :meth:`train_batches` uses (``run(batch_size=...)`` sets
        ``task.batch_size``).
    seeds : sequence of int
    budgets : sequence of int or str
        Per-layer budgets: a parameter count or ``'lora:R'`` (R may be
        fractional: ``'lora:0.25'``).
    lrs : sequence of float or dict of str to sequence of float
        One learning-rate grid for every kind, or one per kind.
    alpha : float
        Adapter scale s (``W + s·ΔW``).
    train_size : int or None
        Number of training samples, for the default :meth:`train_batches`.
    """

    name: str = ""
    description: str = ""
    metric: str = "metric"
    higher_is_better: bool = True
    target_modules: Any = None
    trainable: Any = None
    stack: Any = None
    steps: int = 100
    batch_size: int = 16
    seeds: Sequence[int] = (0, 1)
    budgets: Sequence[Any] = ("lora:4",)
    lrs: Any = (3e-3, 1e-2, 3e-2)
    alpha: float = 1.0
    train_size: int | None = None

    def prepare(self) -> None:
        """One-off work before the first run (data, caches). Called once per :func:`run`; default: nothing."""

    def build_model(self, seed: int) -> Any:
        """A fresh copy of the pretrained model (``torch.nn.Module``); ``seed`` initialises any fresh head.

        ``torch.manual_seed(seed)`` has been called just before. A method
        without the ``seed`` argument is accepted too.
        """
        raise NotImplementedError(f"{type(self).__name__}.build_model(seed) is not defined")

    def batch(self, idx: Any) -> Any:
        """The training batch of the train-sample indices ``idx`` (a 1-D ``torch.long`` tensor).

        Used by the default :meth:`train_batches`; define this (and
        ``train_size``) or override :meth:`train_batches`.
        """
        raise NotImplementedError(f"{type(self).__name__}: define batch(idx) and train_size, or train_batches(seed)")

    def train_batches(self, seed: int) -> Iterator[Any]:
        """Endless training batches whose order depends on ``seed`` only (the same for every kind).

        Default: ``batch(idx)`` for ``batch_size`` indices drawn uniformly
        from ``range(train_size)`` with a generator seeded from ``seed``.
        """
        import torch

        if not isinstance(self.train_size, int) or self.train_size < 1:
            raise TuckerPeftError(f"{type(self).__name__}: the default train_batches needs train_size, a positive "
                                  f"int, got {self.train_size!r}")
        gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))
        while True:
            yield self.batch(torch.randint(0, self.train_size, (int(self.batch_size),), generator=gen))

    def loss(self, model: Any, batch: Any) -> Any:
        """A scalar tensor to minimise on ``batch``."""
        raise NotImplementedError(f"{type(self).__name__}.loss(model, batch) is not defined")

    def evaluate(self, model: Any, split: str) -> Any:
        """The metric on ``split`` (``'val'`` or ``'test'``): a float, or a dict with key ``metric`` (and ``'loss'``)."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate(model, split) is not defined")

    def baselines(self) -> dict[str, dict[str, float]]:
        """Reference scores without adapters: ``{label: {'val': m, 'test': m}}``; default none."""
        return {}

    def details(self) -> dict[str, Any]:
        """Facts about the prepared task (sizes, shapes) recorded in ``results.json``; default none."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The task's own options (data sizes...), recorded as ``config['data']``; default none."""
        return {}

    @staticmethod
    def run_frozen(module: Any, inputs: Any, chunk: int = 64) -> Any:
        """The frozen-stem cache: ``module(inputs)`` in chunks of ``chunk`` samples, without autograd.

        For the layers in front of the first adapted one: frozen and
        deterministic (eval mode), so their outputs can be computed once per
        sample in :meth:`prepare`, and :meth:`build_model` can return only the
        adapted layers and what follows.
        """
        import torch

        with torch.no_grad():
            return torch.cat([module(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)])


def task_name(task: Any) -> str:
    return str(getattr(task, "name", "") or type(task).__name__)


def check_task(task: Any) -> None:
    """Raise one :class:`~tucker_peft.TuckerPeftError` naming what ``task`` lacks; accept duck-typed tasks."""
    what = f"task {task_name(task)!r}"
    missing = [m for m in ("build_model", "loss", "evaluate", "train_batches") if not callable(getattr(task, m, None))]
    if missing:
        raise TuckerPeftError(f"{what}: expected the methods of tucker_peft.compare.Task, missing {', '.join(missing)}")
    stack_sets(getattr(task, "stack", None), f"{what}: stack")
    tm = getattr(task, "target_modules", None)
    if not (isinstance(tm, str) and tm) and not (isinstance(tm, (list, tuple)) and tm
                                                  and all(isinstance(t, str) and t for t in tm)):
        raise TuckerPeftError(f"{what}: target_modules: expected a regex or a list of module names, got {tm!r}")
    if not isinstance(getattr(task, "metric", None), str) or not task.metric:
        raise TuckerPeftError(f"{what}: metric: expected a name (str), got {getattr(task, 'metric', None)!r}")
    if not isinstance(getattr(task, "higher_is_better", None), bool):
        raise TuckerPeftError(f"{what}: higher_is_better: expected a bool, got "
                              f"{getattr(task, 'higher_is_better', None)!r}")


def stack_sets(stack: Any, what: str = "stack") -> dict[str, dict[str, str]]:
    """Named stack sets from a task's (or :func:`~tucker_peft.compare.run`'s) ``stack``.

    Parameters
    ----------
    stack : None, dict of str to str, or dict of str to dict of str to str
        None; one set ``{group: regex}`` (named :data:`DEFAULT_STACK_SET`);
        or named sets ``{set name: {group: regex}}``.
    what : str
        Label of ``stack`` in the error message.

    Returns
    -------
    dict of str to dict of str to str
        ``{set name: {group: regex}}`` ({} for None). The regexes are checked
        by ``AdapterConfig(stack=...)`` when a run uses the set.
    """
    if stack is None:
        return {}
    expected = ("expected None, {group: regex} (one set, called 'layers') or {set name: {group: regex}}, got ")
    if not isinstance(stack, Mapping) or not stack:
        raise TuckerPeftError(f"{what}: {expected}{stack!r:.200}")
    if all(isinstance(v, str) for v in stack.values()):
        stack = {DEFAULT_STACK_SET: stack}
    out = {}
    for name, groups in stack.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise TuckerPeftError(f"{what}: set names must be identifiers (as in 'tucker@layers'), got {name!r:.80}")
        if not isinstance(groups, Mapping) or not groups or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in groups.items()):
            raise TuckerPeftError(f"{what}: {expected}{stack!r:.200}")
        out[name] = dict(groups)
    return out


def build_model(task: Any, seed: int) -> Any:
    """``task.build_model(seed)``, or ``task.build_model()`` for a method without parameters."""
    fn: Callable[..., Any] = task.build_model
    try:
        takes_seed = len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        takes_seed = True
    return fn(seed) if takes_seed else fn()


def metric_value(result: Any, metric: str) -> tuple[float, float]:
    """``(metric, loss)`` from what ``evaluate`` returned (a number or a dict); NaN where absent."""
    if isinstance(result, Mapping):
        if metric not in result:
            raise TuckerPeftError(f"evaluate returned a dict without the metric {metric!r} (keys {list(result)})")
        m, loss = result[metric], result.get("loss", math.nan)
    else:
        m, loss = result, math.nan
    try:
        return float(m), float(loss)
    except (TypeError, ValueError):
        raise TuckerPeftError(f"evaluate: expected a number for {metric!r}, got {m!r}") from None
