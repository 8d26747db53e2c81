"""Classic norm-act baselines behind the same contract as the EvoNorms."""
from __future__ import annotations

import torch
from torch import nn

from .common import check_input, per_channel, resolve_groups, stats_dtype

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def make_act(act: str, apply_act: bool) -> nn.Module:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act](inplace=True) if apply_act else nn.Identity()


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (``apply_act=False``: BatchNorm alone)."""

    def __init__(self, num_features: int, *, apply_act: bool = True, act: str = "relu", eps: float = 1e-5,
                 momentum: float = 0.1, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.apply_act = apply_act
        self.act = make_act(act, apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        return self.act(super().forward(x))


class SyncBatchNormAct2d(nn.SyncBatchNorm):
    """BatchNormAct2d with batch statistics synchronised across DDP processes; made by ``convert_sync_batchnorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        return self.act(super().forward(x))


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps BatchNormAct2d a norm + activation (torch's turns it
    into a plain SyncBatchNorm and silently drops the activation). Parameters, buffers and the activation stay the
    same objects; ``revert_sync_batchnorm`` undoes it."""
    if type(module) is BatchNormAct2d:
        module.__class__, module.process_group = SyncBatchNormAct2d, process_group
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn the SyncBatchNormAct2d layers of ``module`` back into BatchNormAct2d (plain SyncBatchNorm is left)."""
    for layer in module.modules():
        if type(layer) is SyncBatchNormAct2d:
            layer.__class__ = BatchNormAct2d
            del layer.process_group
    return module


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (largest divisor of C <= groups) followed by an activation."""

    def __init__(self, num_features: int, *, apply_act: bool = True, act: str = "relu", groups: int = 32,
                 eps: float = 1e-5, device=None, dtype=None):
        super().__init__(resolve_groups(num_features, groups), num_features, eps=eps, device=device, dtype=dtype)
        self.num_features = num_features
        self.apply_act = apply_act
        self.act = make_act(act, apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        return self.act(super().forward(x))


class FilterResponseNormTLU(nn.Module):
    """Filter Response Normalization + Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

    y = max(x / sqrt(mean_{H,W}(x^2) + eps) * weight + bias, tau); ``apply_act=False`` drops the TLU.
    """

    def __init__(self, num_features: int, *, apply_act: bool = True, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.apply_act = apply_act
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.tau = nn.Parameter(torch.zeros(num_features, **factory)) if apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        xs = x.to(stats_dtype(x))
        nu2 = xs.square().mean(dim=(2, 3), keepdim=True)
        y = xs * torch.rsqrt(nu2 + self.eps) * per_channel(self.weight) + per_channel(self.bias)
        if self.apply_act:
            y = torch.maximum(y, per_channel(self.tau))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}"
