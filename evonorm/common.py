"""Shared pieces of the norm-act layers: input checks, group choice, per-channel reshapes."""
from __future__ import annotations

import torch

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


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """View a (C,) tensor so that it broadcasts against (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics run in float32 for half inputs (autocast), in the input's own dtype otherwise (float64 stays)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
