"""Shared pieces of the norm-act layers: their parameters and affine output, input checks, group choice,
per-channel reshapes."""
from __future__ import annotations

import logging
import math
import numbers

import torch
from torch import nn

log = logging.getLogger(__name__)

LINEAR_MODES = ("affine", "normalize")
IMPLS = ("fast", "reference")  # fast: evonorm.fused autograd functions; reference: plain autograd ops


def resolve_groups(num_channels: int, groups: int) -> int:
    """Largest divisor of ``num_channels`` that is <= ``groups`` (the reference fallback: 40 -> 20, 112 -> 28)."""
    if num_channels < 1 or groups < 1:
        raise ValueError(f"num_channels and groups must be positive, got {num_channels} and {groups}")
    return max(g for g in range(1, min(groups, num_channels) + 1) if num_channels % g == 0)


def check_input(module: torch.nn.Module, x: torch.Tensor, num_features: int) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{type(module).__name__} expects a 4D input (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{type(module).__name__} was built for {num_features} channels but the input has "
            f"{x.shape[1]} (shape {tuple(x.shape)}); is the channel axis second?"
        )


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming ``what`` (an argument or variable) and them."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    return value


def check_range(value, what: str, low: float, high: float = math.inf, kind: type = numbers.Real):
    """``value`` if it is a number of ``kind`` in [low, high]; else a ValueError naming ``what`` (an argument) and
    the range."""
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise ValueError(f"{what} must be {'a whole number' if kind is numbers.Integral else 'a number'} in "
                         f"[{low}, {high}], got {value!r}")
    return value


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """View a (C,) tensor so that it broadcasts against (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics run in float32 for half inputs (autocast), in the input's own dtype otherwise (float64 stays)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class EvoNormParams(nn.Module):
    """The parameters and affine output of an EvoNorm layer: ``weight`` (ones), ``bias`` (zeros) and, where the
    variant has one and the layer has its activation (as in the reference), ``v`` (ones)."""
    has_v = False

    def __init__(self, num_features: int, apply_act: bool, device=None, dtype=None):
        super().__init__()
        self.num_features = int(check_range(num_features, "num_features", 1, kind=numbers.Integral))
        self.apply_act = apply_act
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        if self.has_v and apply_act:
            self.v = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        return (x * per_channel(self.weight) + per_channel(self.bias)).to(x.dtype)

    def empty_batch(self, x: torch.Tensor, *connected: torch.Tensor) -> torch.Tensor:
        """The output of an empty batch (no statistics; a running variance stays as it is), with every parameter
        and ``connected`` (a synced variance, whose all-reduce must run in every process's backward) in its graph
        at zero weight: DDP's gradient reduction waits for each parameter in every process."""
        out = self.affine(x)
        for t in (getattr(self, "v", None), *connected):
            if t is not None:
                out = out + 0 * t.sum()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before v existed only with the activation hold one here that never entered the output
        if not hasattr(self, "v") and state_dict.pop(prefix + "v", None) is not None:
            log.debug("%sv dropped: a layer without activation has no v", prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
