"""EvoNorm B-series: batch-dependent layers with a running variance (reference: tensorflow/tpu resnet_model.py).

y = x / max(sqrt(var_{N,H,W}(x) + eps), instance_term(x)) * weight + bias, where the instance term is
  B0: v * x + sqrt(var_{H,W}(x) + eps)
  B1: (x + 1) * sqrt(mean_{H,W}(x^2) + eps)
  B2: sqrt(mean_{H,W}(x^2) + eps) - x
No mean is subtracted anywhere. ``apply_act=False`` is the reference's affine-only layer.
The batch variance is per device as in the reference; ``sync_stats=True`` (an explicit, logged option) all-reduces it
across the processes of the default process group in training, as SyncBatchNorm does (plain formulas, not the fused
kernels).
``impl="fast"`` (default) runs the layer with activation as one autograd function (evonorm.fused); ``"reference"``
keeps the plain ops below (needed for double backward).
"""
from __future__ import annotations

import logging
from functools import cache

import torch
import torch.distributed as dist

from .common import (IMPLS, LINEAR_MODES, EvoNormParams, check_choice, check_input, check_range, per_channel,
                     stats_dtype)
from .fused import evonorm_batch, update_running_var

log = logging.getLogger(__name__)


class _EvoNormBatch(EvoNormParams):
    variant = ""  # "b0" / "b1" / "b2": the instance term in evonorm.fused

    def __init__(
        self,
        num_features: int,
        *,
        apply_act: bool = True,
        eps: float = 1e-5,
        momentum: float = 0.1,
        linear: str = "affine",
        impl: str = "fast",
        sync_stats: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, apply_act, device, dtype)
        self.eps = check_range(eps, "eps", 0)
        # None (BatchNorm's cumulative average) has no counterpart in the reference
        self.momentum = check_range(momentum, "momentum", 0, 1)
        self.linear = check_choice(linear, LINEAR_MODES, "linear")
        self.impl = check_choice(impl, IMPLS, "impl")
        self.sync_stats = sync_stats
        if sync_stats:
            _log_sync_stats()
        if not apply_act and linear == "normalize":
            log.info("%s(%d): linear='normalize' divides by the batch std (the reference is affine only)",
                     type(self).__name__, num_features)
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))

    def instance_term(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        if not self.apply_act and self.linear == "affine":
            return self.affine(x)
        synced = self.sync_stats and self.training and dist.is_available() and dist.is_initialized()
        if x.shape[0] == 0 and not synced:  # synced: an empty share still takes part in the all-reduce
            return self.empty_batch(x)
        if self.impl == "fast" and self.apply_act and not synced:
            return evonorm_batch(x, self.weight, self.bias, getattr(self, "v", None), self.running_var,
                                 variant=self.variant, eps=self.eps, momentum=self.momentum, training=self.training)
        xs = x.to(stats_dtype(x))
        if self.training:
            var = synced_batch_var(xs) if synced else xs.var(dim=(0, 2, 3), unbiased=False)
            update_running_var(self.running_var, var, self.momentum)
        else:
            var = self.running_var.to(xs.dtype)
        if x.shape[0] == 0:
            return self.empty_batch(x, var)
        den = per_channel(var.add(self.eps).sqrt())
        if self.apply_act:
            den = torch.maximum(den, self.instance_term(xs))
        return self.affine(xs / den).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}, momentum={self.momentum}, "
                f"linear={self.linear!r}, impl={self.impl!r}" + (", sync_stats=True" if self.sync_stats else ""))


@cache
def _log_sync_stats() -> None:
    log.info("EvoNorm B-series: sync_stats=True, the batch variance is all-reduced across processes in training "
             "(the reference keeps it per device); such layers run the plain formulas, not the fused kernels")


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes. Every process uses the sum, so its gradient is the sum of all processes' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def synced_batch_var(x: torch.Tensor) -> torch.Tensor:
    """Biased variance over (N, H, W) of the batches of all processes, differentiable (the backward all-reduces the
    gradients too). Mean first, then centred squares: exact for a large mean; shares may differ in size."""
    count = x.new_full((1,), x.numel() // x.shape[1])
    totals = _AllReduceSum.apply(torch.cat([x.sum(dim=(0, 2, 3)), count]))
    mean = totals[:-1] / totals[-1]
    return _AllReduceSum.apply((x - per_channel(mean)).square().sum(dim=(0, 2, 3))) / totals[-1]


def instance_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x.var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt()


def instance_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x.square().mean(dim=(2, 3), keepdim=True).add(eps).sqrt()


class EvoNormB0(_EvoNormBatch):
    variant = "b0"
    has_v = True

    def instance_term(self, x):
        return per_channel(self.v) * x + instance_std(x, self.eps)


class EvoNormB1(_EvoNormBatch):
    variant = "b1"
    def instance_term(self, x):
        return (x + 1) * instance_rms(x, self.eps)


class EvoNormB2(_EvoNormBatch):
    variant = "b2"
    def instance_term(self, x):
        return instance_rms(x, self.eps) - x
