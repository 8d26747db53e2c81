"""Classification models that take a norm-act factory and use it at every norm position.

``norm_act(num_features, apply_act=True)`` is the only way a model gets a normalization layer, so the BN-ReLU
baseline and every EvoNorm share the identical architecture. The pre-activation ResNets live in
``tasks.common.backbones`` (detection uses them too); MobileNetV2 is classification's own. Any torchvision or timm
classifier (``torchvision:<name>``, ``timm:<name>``) gets the layer by conversion (``tasks.common.library_models``).
"""
from __future__ import annotations

import logging

import inspect

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


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) from Sandler et al. 2018
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, norm_act: NormAct, num_classes: int, in_chans: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2):
        super().__init__()
        scale = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731 - as the reference: multiples of 8
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


PROJECT_ARCHS = (*PREACT_RESNETS, "mobilenet_v2")


def build_model(arch: str, norm_act: NormAct, num_classes: int, in_chans: int = 3, width: int = 16,
                blocks_per_stage: int = 1, width_mult: float = 1.0, dropout: float = 0.2, weights: str | None = None,
                kwargs: dict | None = None) -> nn.Module:
    """``arch``: preact_resnet18, preact_resnet50 (224 px), preact_resnet_cifar (28-32 px; ``width``,
    ``blocks_per_stage``), mobilenet_v2 (``width_mult``, ``dropout``), or a library's classifier
    (``torchvision:<name>``, ``timm:<name>``; ``kwargs`` go to its constructor). ``weights``: a file to start from
    (a run's checkpoint, or a library's state dict for its models)."""
    if is_library_arch(arch):
        defaults = inspect.signature(build_model).parameters
        ours = {k: v for k, v in (("width", width), ("blocks_per_stage", blocks_per_stage),
                                  ("width_mult", width_mult), ("dropout", dropout)) if v != defaults[k].default}
        if ours:
            raise ValueError(f"{', '.join(f'task.model.{k}={v}' for k, v in ours.items())}: set for this project's "
                             f"models; a library model takes its constructor's options as task.model.kwargs (e.g. "
                             f"task.model.kwargs={{{', '.join(f'{k}: {v}' for k, v in ours.items())}}})")
        return library_model(arch, norm_act, num_classes, in_chans, weights, kwargs)
    if kwargs:
        raise ValueError(f"task.model.kwargs={kwargs} go to a torchvision or timm model's constructor; {arch} takes "
                         "task.model.width, blocks_per_stage, width_mult, dropout")
    if arch in PREACT_RESNETS:
        model = preact_resnet(arch, norm_act, num_classes, in_chans, width, blocks_per_stage)
    elif arch == "mobilenet_v2":
        model = MobileNetV2(norm_act, num_classes, in_chans, width_mult, dropout)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(PROJECT_ARCHS)}, or a classifier of "
                         f"torchvision or timm as torchvision:<name> or timm:<name> (names: "
                         f"{' and '.join(LIBRARIES.values())})")
    if weights:
        load_weights(model, read_weights(weights, "task.model.weights"), f"task.model.weights={weights}",
                     classifier=last_linear(model))
    return model
