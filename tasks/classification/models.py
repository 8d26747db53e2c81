"""Classification models that take a norm-act factory and use it at every norm position.

``norm_act(num_features, apply_act=True)`` is the only way a model gets a normalization layer, so the BN-ReLU
baseline and every EvoNorm share the identical architecture.
"""
from __future__ import annotations

import logging
from typing import Callable

from torch import nn

log = logging.getLogger(__name__)
NormAct = Callable[..., nn.Module]


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
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        init_weights(self)

    def forward(self, x):
        return self.head(self.final_norm(self.stages(self.stem(x))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm_act: NormAct):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv1x1(cin, hidden), norm_act(hidden)]
        layers += [conv3x3(hidden, hidden, stride, groups=hidden), norm_act(hidden),
                   conv1x1(hidden, cout), norm_act(cout, apply_act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) from Sandler et al. 2018
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, norm_act: NormAct, num_classes: int, in_chans: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2):
        super().__init__()
        scale = lambda c: max(8, int(c * width_mult + 4) // 8 * 8)  # noqa: E731 - round to multiples of 8
        cin = scale(32)
        layers = [nn.Conv2d(in_chans, cin, 3, 2, 1, bias=False), norm_act(cin)]
        for expand, channels, blocks, stride in self.SETTINGS:
            for i in range(blocks):
                layers.append(InvertedResidual(cin, scale(channels), stride if i == 0 else 1, expand, norm_act))
                cin = scale(channels)
        last = max(1280, scale(1280))
        layers += [conv1x1(cin, last), norm_act(last)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(last, num_classes))
        linear_norm = self.features[2].body[-1]
        log.info("MobileNetV2: the %d linear-bottleneck positions use norm_act(apply_act=False): %r",
                 len(self.features) - 4, linear_norm)
        init_weights(self)

    def forward(self, x):
        return self.head(self.features(x))


def init_weights(model: nn.Module) -> None:
    """He init for convs, small normal for the classifier; norm layers keep their own init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def build_model(arch: str, norm_act: NormAct, num_classes: int, in_chans: int = 3, width: int = 16,
                blocks_per_stage: int = 1, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """``arch``: preact_resnet18, preact_resnet50 (224 px), preact_resnet_cifar (28-32 px; ``width``,
    ``blocks_per_stage``), mobilenet_v2 (``width_mult``, ``dropout``)."""
    if arch == "preact_resnet18":
        return PreActResNet(PreActBasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], norm_act, num_classes, in_chans)
    if arch == "preact_resnet50":
        return PreActResNet(PreActBottleneck, [3, 4, 6, 3], [64, 128, 256, 512], norm_act, num_classes, in_chans)
    if arch == "preact_resnet_cifar":
        return PreActResNet(PreActBasicBlock, [blocks_per_stage] * 3, [width, 2 * width, 4 * width], norm_act,
                            num_classes, in_chans, stem="cifar")
    if arch == "mobilenet_v2":
        return MobileNetV2(norm_act, num_classes, in_chans, width_mult, dropout)
    raise ValueError(f"unknown arch {arch!r}; choose from preact_resnet18, preact_resnet50, "
                     "preact_resnet_cifar, mobilenet_v2")
