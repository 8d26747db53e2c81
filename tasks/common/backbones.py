"""Pre-activation ResNets (reference v2 placement) that take a norm-act factory at every norm position.

Shared by classification (whole network with its classifier) and detection (the stages as a feature extractor);
needs only torch. ``norm_act(num_features, apply_act=True)`` is the only way a model gets a normalization layer, so
the BN-ReLU baseline and every EvoNorm share the identical architecture.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NormAct = Callable[..., nn.Module]
PREACT_RESNETS = ("preact_resnet18", "preact_resnet50", "preact_resnet_cifar")


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, norm_act: NormAct):
        super().__init__()
        cout = width * self.expansion
        self.norm1 = norm_act(cin)
        self.conv1 = conv3x3(cin, width, stride)
        self.norm2 = norm_act(width)
        self.conv2 = conv3x3(width, cout)
        self.shortcut = conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.norm1(x)
        shortcut = x if self.shortcut is None else self.shortcut(y)
        return self.conv2(self.norm2(self.conv1(y))) + shortcut


class PreActBottleneck(nn.Module):
    """Reference v2 bottleneck: the branch ends with a conv (no norm, no zero-init), stride in the 3x3."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm_act: NormAct):
        super().__init__()
        cout = width * self.expansion
        self.norm1 = norm_act(cin)
        self.conv1 = conv1x1(cin, width)
        self.norm2 = norm_act(width)
        self.conv2 = conv3x3(width, width, stride)
        self.norm3 = norm_act(width)
        self.conv3 = conv1x1(width, cout)
        self.shortcut = conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.norm1(x)
        shortcut = x if self.shortcut is None else self.shortcut(y)
        out = self.conv2(self.norm2(self.conv1(y)))
        return self.conv3(self.norm3(out)) + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet (v2): stem conv (no norm-act after it), stages, final norm-act, pool, classifier."""

    def __init__(self, block: type[nn.Module], depths: list[int], widths: list[int], norm_act: NormAct,
                 num_classes: int, in_chans: int = 3, stem: str = "imagenet"):
        """``num_classes=0``: no classifier, the head only pools (a feature extractor)."""
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
            strides = [1] + [2] * (len(widths) - 1)
            cin = widths[0]
        elif stem == "cifar":
            self.stem = conv3x3(in_chans, widths[0])
            strides = [1] + [2] * (len(widths) - 1)
            cin = widths[0]
        else:
            raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
        stages = []
        for depth, width, stride in zip(depths, widths, strides):
            blocks = []
            for i in range(depth):
                blocks.append(block(cin, width, stride if i == 0 else 1, norm_act))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_norm = norm_act(cin)
        self.out_channels = [width * block.expansion for width in widths]
        classifier = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier)
        init_weights(self)

    def forward(self, x):
        return self.head(self.final_norm(self.stages(self.stem(x))))

    def stage_outputs(self, x) -> list[torch.Tensor]:
        """Each stage's output (C2..C5 for the ImageNet stem), before any norm: pre-activation sums."""
        outputs = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


def init_weights(model: nn.Module) -> None:
    """He init for convs, small normal for the classifier; norm layers keep their own init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def preact_resnet(arch: str, norm_act: NormAct, num_classes: int, in_chans: int = 3, width: int = 16,
                  blocks_per_stage: int = 1) -> PreActResNet:
    """``arch``: preact_resnet18, preact_resnet50 (ImageNet stem, 4 stages), preact_resnet_cifar (28-32 px;
    ``width``, ``blocks_per_stage``, 3 stages)."""
    if arch == "preact_resnet18":
        return PreActResNet(PreActBasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], norm_act, num_classes, in_chans)
    if arch == "preact_resnet50":
        return PreActResNet(PreActBottleneck, [3, 4, 6, 3], [64, 128, 256, 512], norm_act, num_classes, in_chans)
    if arch == "preact_resnet_cifar":
        return PreActResNet(PreActBasicBlock, [blocks_per_stage] * 3, [width, 2 * width, 4 * width], norm_act,
                            num_classes, in_chans, stem="cifar")
    raise ValueError(f"unknown pre-activation ResNet {arch!r}; choose from {', '.join(PREACT_RESNETS)}")
