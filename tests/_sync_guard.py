"""A torch tensor subclass that counts reads of device values on the host.

Stands in for a GPU array on CPU-only CI: every ``float()``, ``bool()``,
``.item()``, ``.cpu()``, ``.numpy()``... is counted, so a test can assert that a
training step makes none.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class HostReadCounter(torch.Tensor):
    reads = 0
    HOST = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
            torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
            torch.Tensor.__array__, torch.Tensor.__format__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST:
            HostReadCounter.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def guarded(a) -> "HostReadCounter":
    """``a`` (NumPy or torch) as a float64 counting tensor."""
    return torch.as_tensor(a, dtype=torch.float64).as_subclass(HostReadCounter)
