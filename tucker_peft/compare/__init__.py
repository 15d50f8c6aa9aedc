"""Compare adapter kinds on a fine-tuning task at equal budgets: the protocol behind ``tucker-peft compare``.

>>> from tucker_peft import compare                               # doctest: +SKIP
>>> res = compare.run(MyTask(), budgets=["lora:0.25", "lora:1"], seeds=3, out="cmp")  # doctest: +SKIP
>>> print(res.table())                                            # doctest: +SKIP

Modules: :mod:`~tucker_peft.compare.task` (the :class:`Task` protocol),
:mod:`~tucker_peft.compare.runner` (:func:`run`, :class:`Results`),
:mod:`~tucker_peft.compare.stats` (learning-rate selection, paired intervals,
seeds needed, Pareto front), :mod:`~tucker_peft.compare.plots` and
:mod:`~tucker_peft.compare.tasks` (the built-in ``crnn``, ``minilm`` and
``tiny`` tasks). Importing this package does not import torch; :func:`run`
does. ``import tucker_peft`` does not import this package.
"""

from .runner import KINDS, Results, parse_budget, parse_reference, run
from .task import Task
from .tasks import BUILTIN_TASKS, DEFAULT_TASK, CRNNTask, MiniLMTask, TinyTask, builtin_task

__all__ = ["Task", "run", "Results", "KINDS", "parse_budget", "parse_reference", "BUILTIN_TASKS", "DEFAULT_TASK",
           "CRNNTask", "MiniLMTask", "TinyTask", "builtin_task"]
