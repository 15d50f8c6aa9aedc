"""PyTorch binding: Tucker, CP and flattened-LoRA adapters on real ``nn.Module`` models.

>>> from tucker_peft.backends.torch import AdapterConfig, inject, summary
>>> model = inject(model, AdapterConfig(kind="tucker", budget="lora:8", target_modules=["conv2", "conv3"]))
>>> print(summary(model))

Supported layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any stride, padding,
padding_mode, dilation and groups; ΔW has the weight's true shape
``(out, in/groups, *kernel)``), ``nn.Embedding``, and any N-D parameter by
path (``target_parameters``) through ``torch.nn.utils.parametrize``.
"""

from ._combine import add_weighted_adapter
from ._config import AdapterConfig
from ._export import export_peft, export_peft_lora, lora_factors
from ._io import load_adapter, save_adapter
from ._layers import AdaptedLayer, DeltaParametrization, DeltaWeight
from ._model import (Summary, active_adapter, adapted_layers, adapter_names, add_adapter, delete_adapter,
                     disable_adapters, inject,
                     merge, merge_and_unload, set_adapter, summary, trainable_parameters, unmerge)

__all__ = [
    "AdapterConfig",
    "inject",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "add_weighted_adapter",
    "disable_adapters",
    "adapter_names",
    "active_adapter",
    "adapted_layers",
    "summary",
    "Summary",
    "merge",
    "unmerge",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
    "export_peft",
    "export_peft_lora",
    "lora_factors",
    "trainable_parameters",
    "AdaptedLayer",
    "DeltaWeight",
    "DeltaParametrization",
]
