"""BigGAN building blocks: spectral-norm convs/linears, the class-conditional norm-act wrapper, self-attention.

Class-conditional norm-act: the chosen layer's own normalization and nonlinearity with its own per-channel affine
off, and a per-sample affine ``(1 + gain(c)) * h + bias(c)`` from the conditioning vector c (shared class embedding
and z chunk) *at the position of the layer's own affine*:
- norm-then-act layers (``bn_*``, ``gn_*``): between the normalization and the activation, i.e.
  ``act((1 + gain(c)) * norm(x) + bias(c))``. ``bn_relu`` is exactly BigGAN's conditional BatchNorm.
- FRN-TLU: ``max((1 + gain(c)) * frn(x) + bias(c), tau)`` (tau stays per channel).
- EvoNorms, whose ``* weight + bias`` closes the formula: the conditional affine replaces it at the output, e.g.
  S0: ``(1 + gain(c)) * x * sigmoid(v * x) / sqrt(var_group(x) + eps) + bias(c)`` (v stays per channel),
  B0: ``(1 + gain(c)) * x / max(sqrt(var_{N,H,W}(x) + eps), v * x + sqrt(var_{H,W}(x) + eps)) + bias(c)``.
evonorm has no switch for "affine off", so the wrapper fixes the layer's weight at 1 and bias at 0 (frozen, not
trained): the layer then computes exactly its formula without the affine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from evonorm import BatchNormAct2d, FilterResponseNormTLU, GroupNormAct
from evonorm.common import per_channel

NORM_THEN_ACT = (BatchNormAct2d, GroupNormAct)


def orthogonal_sn(module: nn.Module, eps: float = 1e-6) -> nn.Module:
    """BigGAN's orthogonal init (zero bias), then spectral norm.

    In this order the spectral norm's power-iteration vectors (computed when it is registered) belong to the final
    weight. Re-initialising the weight afterwards would leave them stale: an eval-mode forward (no power iteration)
    would then divide each weight by u^T W v of unrelated vectors (|sigma| ~ 0.01-0.2, random sign), e.g. the
    untrained generator that results.json measures as the reference.
    """
    nn.init.orthogonal_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return spectral_norm(module, eps=eps)


def sn_conv(in_ch: int, out_ch: int, kernel_size: int = 3, eps: float = 1e-6) -> nn.Module:
    return orthogonal_sn(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2), eps)


def sn_linear(in_features: int, out_features: int, bias: bool = True, eps: float = 1e-6) -> nn.Module:
    return orthogonal_sn(nn.Linear(in_features, out_features, bias=bias), eps)


def freeze_affine(layer: nn.Module) -> None:
    """Fix the layer's per-channel affine at the identity (weight 1, bias 0) and take it out of training."""
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)


class ConditionalNormAct(nn.Module):
    """The chosen norm-act layer with a class-conditional affine in place of its own (see the module docstring)."""

    def __init__(self, norm_act, num_features: int, cond_dim: int, sn_eps: float = 1e-6):
        super().__init__()
        self.num_features = num_features
        self.norm = norm_act(num_features, apply_act=True)
        freeze_affine(self.norm)
        self.act: nn.Module = nn.Identity()
        self.tau: nn.Parameter | None = None
        if isinstance(self.norm, NORM_THEN_ACT):  # move the activation after the conditional affine
            self.act, self.norm.act = self.norm.act, nn.Identity()
        elif isinstance(self.norm, FilterResponseNormTLU):  # the TLU takes the conditional affine's output
            self.tau, self.norm.tau = self.norm.tau, None
            self.norm.apply_act = False
        self.gain = sn_linear(cond_dim, num_features, bias=False, eps=sn_eps)
        self.bias = sn_linear(cond_dim, num_features, bias=False, eps=sn_eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain = (1 + self.gain(cond)).view(-1, self.num_features, 1, 1)
        bias = self.bias(cond).view(-1, self.num_features, 1, 1)
        y = self.norm(x) * gain + bias
        if self.tau is not None:
            y = torch.maximum(y, per_channel(self.tau))
        return self.act(y)


class SelfAttention(nn.Module):
    """BigGAN's non-local block: theta/phi/g 1x1 convs (phi, g max-pooled by 2), output scaled by gamma (init 0)."""

    def __init__(self, ch: int, sn_eps: float = 1e-6):
        super().__init__()
        if ch < 8:
            raise ValueError(f"self-attention needs at least 8 channels (theta/phi have ch // 8), got {ch}")
        self.ch = ch
        self.theta = sn_conv(ch, ch // 8, 1, sn_eps)
        self.phi = sn_conv(ch, ch // 8, 1, sn_eps)
        self.g = sn_conv(ch, ch // 2, 1, sn_eps)
        self.o = sn_conv(ch // 2, ch, 1, sn_eps)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)
        g = F.max_pool2d(self.g(x), 2).flatten(2)
        beta = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (n, hw, hw/4)
        o = (g @ beta.transpose(1, 2)).view(n, self.ch // 2, h, w)
        return x + self.gamma * self.o(o)
