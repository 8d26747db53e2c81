"""Classification models that take a norm-act factory and use it at every norm position.

``norm_act(num_features, apply_act=True)`` is the only way a model gets a normalization layer, so the BN-ReLU
baseline and every EvoNorm share the identical architecture. The pre-activation ResNets live in
``tasks.common.backbones`` (detection uses them too); MobileNetV2 and EfficientNet are classification's own. Any
torchvision or timm classifier (``torchvision:<name>``, ``timm:<name>``) gets the layer by conversion
(``tasks.common.library_models``).
"""
from __future__ import annotations

import inspect
import logging
import math

from timm.layers import make_divisible
from torch import nn

from tasks.common.backbones import PREACT_RESNETS, NormAct, conv1x1, conv3x3, init_weights, preact_resnet
from tasks.common.library_models import LIBRARIES, is_library_arch, last_linear, library_model
from tasks.common.weights import load_weights, read_weights

log = logging.getLogger(__name__)


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


def capped_strides(strides: list[int], output_stride: int) -> list[int]:
    """The strides in network order with every stride-2 step that would take the total stride beyond
    ``output_stride`` made 1 (no dilation): small inputs keep maps larger than 1x1 in the later stages."""
    total, capped = 1, []
    for stride in strides:
        capped.append(stride if total * stride <= output_stride else 1)
        total *= capped[-1]
    return capped


def mobile_blocks(settings: list[tuple], depth_mult: float, output_stride: int) -> tuple[int, list[tuple]]:
    """The stem's stride and, per block of a MobileNet-style network, its stage's setting (expansion, channels,
    blocks, stride, ...) and its own stride: ceil(blocks * ``depth_mult``) blocks per stage, the stage's stride in
    its first, the total stride capped at ``output_stride``."""
    blocks = [(setting, setting[3] if i == 0 else 1) for setting in settings
              for i in range(math.ceil(setting[2] * depth_mult))]
    stem_stride, *strides = capped_strides([2] + [stride for _, stride in blocks], output_stride)
    return stem_stride, [(setting, stride) for (setting, _), stride in zip(blocks, strides)]


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) from Sandler et al. 2018
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, norm_act: NormAct, num_classes: int, in_chans: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2, depth_mult: float = 1.0, output_stride: int = 32):
        """``depth_mult``: ceil(blocks * depth_mult) blocks per stage; ``output_stride``: the total stride (the
        reference's: 17 blocks, 32)."""
        super().__init__()
        scale = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731 - as the reference: multiples of 8
        cin = scale(32)
        stem_stride, blocks = mobile_blocks(self.SETTINGS, depth_mult, output_stride)
        layers = [nn.Conv2d(in_chans, cin, 3, stem_stride, 1, bias=False), norm_act(cin)]
        for (expand, channels, _, _), stride in blocks:
            layers.append(InvertedResidual(cin, scale(channels), stride, expand, norm_act))
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


class SqueezeExcite(nn.Module):
    """Channel gate from the pooled input: reduce, SiLU, expand, sigmoid (not a norm position: no norm-act)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class MBConv(nn.Module):
    """EfficientNet's block: [1x1 expand, norm-act], depthwise kxk, norm-act, squeeze-excite (a quarter of the
    block's input channels), 1x1 project, norm-act without activation (linear bottleneck); identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int, norm_act: NormAct):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv1x1(cin, hidden), norm_act(hidden)]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                   norm_act(hidden), SqueezeExcite(hidden, max(1, round(cin * 0.25))),
                   conv1x1(hidden, cout), norm_act(cout, apply_act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class EfficientNet(nn.Module):
    """EfficientNet-B0's layout (Tan & Le 2019) with ``width_mult``, ``depth_mult`` and ``output_stride`` (B0: 1.0,
    1.0 and 32; 5.29M parameters as timm's efficientnet_b0); the norm-act factory at every BN-SiLU (and, without
    activation, after each projection)."""
    # (expansion, channels, blocks, stride, kernel)
    SETTINGS = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
                (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]

    def __init__(self, norm_act: NormAct, num_classes: int, in_chans: int = 3, width_mult: float = 1.0,
                 depth_mult: float = 1.0, dropout: float = 0.2, output_stride: int = 32):
        super().__init__()
        scale = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731 - as timm's round_channels
        cin = scale(32)
        stem_stride, blocks = mobile_blocks(self.SETTINGS, depth_mult, output_stride)
        layers = [nn.Conv2d(in_chans, cin, 3, stem_stride, 1, bias=False), norm_act(cin)]
        for (expand, channels, _, _, kernel), stride in blocks:
            layers.append(MBConv(cin, scale(channels), stride, expand, kernel, norm_act))
            cin = scale(channels)
        layers += [conv1x1(cin, scale(1280)), norm_act(scale(1280))]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(scale(1280), num_classes))
        init_weights(self)

    def forward(self, x):
        return self.head(self.features(x))


PROJECT_ARCHS = (*PREACT_RESNETS, "mobilenet_v2", "efficientnet")


def build_model(arch: str, norm_act: NormAct, num_classes: int, in_chans: int = 3, width: int = 16,
                blocks_per_stage: int = 1, width_mult: float = 1.0, depth_mult: float = 1.0,
                output_stride: int = 32, dropout: float = 0.2, weights: str | None = None,
                kwargs: dict | None = None) -> nn.Module:
    """``arch``: preact_resnet18, preact_resnet50 (224 px), preact_resnet_cifar (28-32 px; ``width``,
    ``blocks_per_stage``), mobilenet_v2 and efficientnet (``width_mult``, ``depth_mult``, ``output_stride``,
    ``dropout``), or a library's classifier
    (``torchvision:<name>``, ``timm:<name>``; ``kwargs`` go to its constructor). ``weights``: a file to start from
    (a run's checkpoint, or a library's state dict for its models)."""
    if is_library_arch(arch):
        defaults = inspect.signature(build_model).parameters
        ours = {k: v for k, v in (("width", width), ("blocks_per_stage", blocks_per_stage),
                                  ("width_mult", width_mult), ("depth_mult", depth_mult),
                                  ("output_stride", output_stride), ("dropout", dropout))
                if v != defaults[k].default}
        if ours:
            raise ValueError(f"{', '.join(f'task.model.{k}={v}' for k, v in ours.items())}: set for this project's "
                             f"models; a library model takes its constructor's options as task.model.kwargs (e.g. "
                             f"task.model.kwargs={{{', '.join(f'{k}: {v}' for k, v in ours.items())}}})")
        return library_model(arch, norm_act, num_classes, in_chans, weights, kwargs)
    if kwargs:
        raise ValueError(f"task.model.kwargs={kwargs} go to a torchvision or timm model's constructor; {arch} takes "
                         "task.model.width, blocks_per_stage, width_mult, depth_mult, output_stride, dropout")
    if arch in PREACT_RESNETS:
        model = preact_resnet(arch, norm_act, num_classes, in_chans, width, blocks_per_stage)
    elif arch == "mobilenet_v2":
        model = MobileNetV2(norm_act, num_classes, in_chans, width_mult, dropout, depth_mult, output_stride)
    elif arch == "efficientnet":
        model = EfficientNet(norm_act, num_classes, in_chans, width_mult, depth_mult, dropout, output_stride)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(PROJECT_ARCHS)}, or a classifier of "
                         f"torchvision or timm as torchvision:<name> or timm:<name> (names: "
                         f"{' and '.join(LIBRARIES.values())})")
    if weights:
        load_weights(model, read_weights(weights, "task.model.weights"), f"task.model.weights={weights}",
                     classifier=last_linear(model))
    return model
