"""Optimizer parameter groups that keep weight decay off norm-act parameters and biases."""
from __future__ import annotations

from torch import nn

from .factory import NORM_LAYER_TYPES


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights with ``weight_decay``; norm-layer parameters and biases with none."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_LAYER_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
