"""EvoNorm S-series: batch-independent layers with grouped statistics (reference: tensorflow/tpu resnet_model.py).

y = numerator(x) / group_stat(x) * weight + bias, groups of contiguous channels as in GroupNorm:
  S0: x * sigmoid(v * x) / sqrt(var_group(x) + eps)
  S1: x * sigmoid(x)     / sqrt(var_group(x) + eps)
  S2: x * sigmoid(x)     / sqrt(mean_group(x^2) + eps)
``apply_act=False`` is the reference's affine-only layer.
``impl="fast"`` (default) runs the layer with activation as one autograd function (evonorm.fused); ``"reference"``
keeps the plain ops below (needed for double backward).
"""
from __future__ import annotations

import logging

import torch

from .common import (IMPLS, LINEAR_MODES, EvoNormParams, check_choice, check_input, check_range, per_channel,
                     resolve_groups, stats_dtype)
from .fused import evonorm_sample

log = logging.getLogger(__name__)


class _EvoNormSample(EvoNormParams):
    uses_variance = True  # False: second moment (S2)

    def __init__(
        self,
        num_features: int,
        *,
        apply_act: bool = True,
        groups: int = 32,
        eps: float = 1e-5,
        linear: str = "affine",
        impl: str = "fast",
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, apply_act, device, dtype)
        self.groups = resolve_groups(num_features, groups)
        if self.groups != groups:
            log.debug("%s(%d): %d groups (largest divisor <= %d)", type(self).__name__, num_features,
                      self.groups, groups)
        self.eps = check_range(eps, "eps", 0)
        self.linear = check_choice(linear, LINEAR_MODES, "linear")
        self.impl = check_choice(impl, IMPLS, "impl")
        if not apply_act and linear == "normalize":
            log.info("%s(%d): linear='normalize' divides by the group statistic (the reference is affine only)",
                     type(self).__name__, num_features)

    def numerator(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        if not self.apply_act and self.linear == "affine":
            return self.affine(x)
        if x.shape[0] == 0:
            return self.empty_batch(x)
        if self.impl == "fast" and self.apply_act:
            return evonorm_sample(x, self.weight, self.bias, getattr(self, "v", None), groups=self.groups,
                                  eps=self.eps, centered=self.uses_variance)
        xs = x.to(stats_dtype(x))
        grouped = xs.reshape(xs.shape[0], self.groups, -1)
        if self.uses_variance:
            stat = grouped.var(dim=-1, unbiased=False, keepdim=True)
        else:
            stat = grouped.square().mean(dim=-1, keepdim=True)
        num = self.numerator(xs) if self.apply_act else xs
        y = (num.reshape_as(grouped) / stat.add(self.eps).sqrt()).reshape_as(xs)
        return self.affine(y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, apply_act={self.apply_act}, groups={self.groups}, eps={self.eps}, " \
               f"linear={self.linear!r}, impl={self.impl!r}"


class EvoNormS0(_EvoNormSample):
    has_v = True

    def numerator(self, x):
        return x * torch.sigmoid(per_channel(self.v) * x)


class EvoNormS1(_EvoNormSample):
    pass


class EvoNormS2(_EvoNormSample):
    uses_variance = False
