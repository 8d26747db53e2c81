"""Mask R-CNN with FPN from torchvision's detection parts, with the chosen norm-act layer at every norm position.

Our parts: the pre-activation ResNet backbone (C2..C5, each followed by a norm-act because pre-activation stage
outputs are un-normalized sums), the FPN's lateral/output convs (``norm_act(apply_act=False)``: no activation
there), the 4conv1fc box head and the 4-conv mask head (norm-act after each conv). torchvision's parts: anchors,
RPN (head without norm, as standard), MultiScaleRoIAlign, losses, sampling, post-processing and
``GeneralizedRCNNTransform``. ``norm_in`` says which of backbone / fpn / heads get the chosen layer; the others get
the standard choice (GN-ReLU backbone, no norm in FPN and heads, where convs take a bias and heads a ReLU).
"""
from __future__ import annotations

import inspect
import json
import logging
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import evonorm
from tasks.common.backbones import NormAct, init_weights, preact_resnet

log = logging.getLogger(__name__)
NORM_POSITIONS = ("backbone", "fpn", "heads")
# torchvision MaskRCNN arguments that task.model passes through (input normalization, RPN / RoI sampling and
# post-processing); the others are our parts
DETECTOR_KWARGS = tuple(p for p in inspect.signature(MaskRCNN).parameters
                        if p.startswith(("image_", "rpn_", "box_", "bbox_"))
                        and p not in ("rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor"))
STANDARD_BACKBONE_NORM = "gn_relu"
# layers whose running statistics freeze_norm_stats keeps fixed (a graph layer without batch aggregations: eval() is a
# no-op there)
BATCH_STATS = (evonorm.EvoNormB0, evonorm.EvoNormB1, evonorm.EvoNormB2, evonorm.GraphNormAct,
               nn.modules.batchnorm._BatchNorm)
DETECTION_BACKBONES = ("preact_resnet18", "preact_resnet50")


class ResNetFPNBackbone(nn.Module):
    """Pre-activation ResNet trunk -> norm-act on C2..C5 -> FPN (P2..P5, plus P6 by max-pooling)."""

    def __init__(self, arch: str, norm_act: NormAct, fpn_norm: NormAct | None, fpn_channels: int):
        super().__init__()
        self.body = preact_resnet(arch, norm_act, num_classes=0)
        del self.body.head  # detection needs the stages only; its final_norm normalizes C5
        channels = self.body.out_channels
        self.level_norms = nn.ModuleList(norm_act(c) for c in channels[:-1])
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=fpn_norm and partial(fpn_norm, apply_act=False))
        self.out_channels = fpn_channels

    def forward(self, x):
        *inner, last = self.body.stage_outputs(x)
        levels = [norm(c) for norm, c in zip(self.level_norms, inner)] + [self.body.final_norm(last)]
        return self.fpn(OrderedDict((str(i), c) for i, c in enumerate(levels)))


class MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's resize and batching, with the shorter side drawn per image from ``train_sizes`` when training
    and ``test_size`` when evaluating. (torchvision's own evaluates at the last training size: a test size appended
    to the training sizes would be drawn in training too, e.g. 800 twice as often as each of 640..768.)"""

    def __init__(self, train_sizes: tuple[int, ...], test_size: int, max_size: int, image_mean: list[float],
                 image_std: list[float]):
        super().__init__(tuple(train_sizes), max_size, image_mean, image_std)
        self.train_sizes, self.test_size = tuple(train_sizes), test_size

    def train(self, mode: bool = True):
        self.min_size = self.train_sizes if mode else (self.test_size,)
        return super().train(mode)


def conv_norm_act(cin: int, cout: int, norm_act: NormAct | None) -> nn.Sequential:
    """3x3 conv followed by the norm-act layer, or (no norm at this position) a biased conv and ReLU."""
    if norm_act is None:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_act(cout))


class ConvFCBoxHead(nn.Module):
    """Box head on the 7x7 RoI features: ``num_convs`` 3x3 convs with norm-act, then ``num_fcs`` FC + ReLU.

    4conv1fc (Wu & He 2018, the GN/EvoNorm detectors' head) by default; 0conv2fc is torchvision's TwoMLPHead.
    """

    def __init__(self, cin: int, channels: int, fc_dim: int, norm_act: NormAct | None, num_convs: int = 4,
                 num_fcs: int = 1, resolution: int = 7):
        super().__init__()
        self.convs = nn.Sequential(*(conv_norm_act(cin if i == 0 else channels, channels, norm_act)
                                     for i in range(num_convs)))
        fc_in = (channels if num_convs else cin) * resolution**2
        self.fcs = nn.Sequential(nn.Flatten(), *(layer for i in range(num_fcs) for layer in
                                                 (nn.Linear(fc_in if i == 0 else fc_dim, fc_dim), nn.ReLU(True))))

    def forward(self, x):
        return self.fcs(self.convs(x))


class MaskHead(nn.Sequential):
    """Mask head: four 3x3 convs with norm-act on the 14x14 RoI features (the predictor upsamples)."""

    def __init__(self, cin: int, channels: int, norm_act: NormAct | None, num_convs: int = 4):
        super().__init__(*(conv_norm_act(cin if i == 0 else channels, channels, norm_act) for i in range(num_convs)))


def placement(norm_name: str, norm_in: list[str]) -> dict[str, str]:
    unknown = set(norm_in) - set(NORM_POSITIONS)
    if unknown:
        raise ValueError(f"task.model.norm_in has unknown positions {sorted(unknown)}; choose from "
                         f"{', '.join(NORM_POSITIONS)}")
    standard = {"backbone": STANDARD_BACKBONE_NORM, "fpn": "none", "heads": "none"}
    return {pos: norm_name if pos in norm_in else standard[pos] for pos in NORM_POSITIONS}


def build_maskrcnn(norm_act: NormAct, num_classes: int, arch: str = "preact_resnet18",
                   norm_in: tuple[str, ...] = NORM_POSITIONS, fpn_channels: int = 256, head_channels: int = 256,
                   box_fc_dim: int = 1024, box_head_convs: int = 4, box_head_fcs: int = 1,
                   anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
                   aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0), train_sizes: tuple[int, ...] = (800,),
                   test_size: int = 800, max_size: int = 1333, roi_sampling_ratio: int = 2,
                   freeze_norm_stats: bool = False, backbone_ckpt: str | None = None,
                   **detector_kwargs) -> MaskRCNN:
    """``num_classes`` counts the background. ``train_sizes``: shorter-side sizes drawn at random per training
    image (multi-scale training); evaluation resizes to ``test_size``. ``roi_sampling_ratio``: bilinear samples
    per RoIAlign bin side (torchvision's 2; 0: adaptive, as detectron2). ``detector_kwargs`` go to torchvision's
    ``MaskRCNN`` (RPN/RoI sampling and post-processing: ``rpn_batch_size_per_image``, ``box_detections_per_img``,
    ...)."""
    if arch not in DETECTION_BACKBONES:
        raise ValueError(f"unknown detection backbone {arch!r}; choose from {', '.join(DETECTION_BACKBONES)}")
    norm_name = layer_name(norm_act)
    where = placement(norm_name, list(norm_in))
    chosen = lambda pos: None if where[pos] == "none" else (  # noqa: E731
        norm_act if where[pos] == norm_name else evonorm.norm_act_factory(where[pos]))
    backbone = ResNetFPNBackbone(arch, chosen("backbone"), chosen("fpn"), fpn_channels)
    if backbone_ckpt:
        load_backbone(backbone.body, backbone_ckpt, arch, where["backbone"])
    levels = len(anchor_sizes)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * levels)
    box_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=roi_sampling_ratio)
    mask_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=roi_sampling_ratio)
    box_head = ConvFCBoxHead(fpn_channels, head_channels, box_fc_dim, chosen("heads"), box_head_convs, box_head_fcs)
    mask_head = MaskHead(fpn_channels, head_channels, chosen("heads"))
    init_weights(box_head), init_weights(mask_head)  # the FPN and torchvision's parts keep their own init
    model = MaskRCNN(backbone, num_classes=None, min_size=tuple(train_sizes), max_size=max_size,
                     rpn_anchor_generator=anchors, box_roi_pool=box_pool, box_head=box_head,
                     box_predictor=FastRCNNPredictor(box_fc_dim, num_classes), mask_roi_pool=mask_pool,
                     mask_head=mask_head, mask_predictor=MaskRCNNPredictor(head_channels, head_channels,
                                                                          num_classes),
                     **detector_kwargs)
    model.transform = MultiScaleTransform(train_sizes, test_size, max_size, model.transform.image_mean,
                                          model.transform.image_std)
    model.norm_placement = where
    model.freeze_norm_stats = freeze_norm_stats
    log.info("Mask R-CNN %s-FPN, box head %dconv%dfc, norm-act per position: %s (standard choice where not in "
             "norm_in=%s)%s", arch, box_head_convs, box_head_fcs,
             ", ".join(f"{pos}={name}" for pos, name in where.items()), list(norm_in),
             "; batch-dependent layers use frozen running statistics" if freeze_norm_stats else "")
    return model


def layer_name(norm_act: NormAct) -> str:
    """The layer name bound in a ``norm_act_factory`` partial (``partial(norm_act, name, ...)``)."""
    return norm_act.args[0] if isinstance(norm_act, partial) and norm_act.args else getattr(norm_act, "name", "?")


class BackboneCheckpointError(ValueError):
    pass


def load_backbone(body: nn.Module, ckpt_path: str, arch: str, norm_name: str) -> None:
    """Initialise the trunk from a ``task=classification`` checkpoint of the same architecture and layer."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task.model.backbone_ckpt={ckpt_path}: no such file (give a classification "
                                "run's checkpoints/best-*.ckpt or last.ckpt)")
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    trunk = {k.removeprefix("model."): v for k, v in state.items()
             if k.startswith("model.") and not k.startswith("model.head.")}
    source = checkpoint_run(path)
    own = body.state_dict()
    problems = [f"it was trained with {key} {value}" for key, value, ours in
                (("model", source.get("model"), arch), ("layer", source.get("norm"), norm_name))
                if value is not None and value != ours]
    for what, keys in (("missing", sorted(set(own) - set(trunk))), ("unexpected", sorted(set(trunk) - set(own))),
                       ("other shape", sorted(k for k in set(own) & set(trunk) if own[k].shape != trunk[k].shape))):
        if keys:
            problems.append(f"{what} tensors {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if problems:
        raise BackboneCheckpointError(
            f"backbone checkpoint {path} (model {source.get('model', '?')}, layer {source.get('norm', '?')}) does "
            f"not fit this run's backbone (model {arch}, layer {norm_name}): {'; '.join(problems)}. Train the "
            f"classification run with task.model.arch={arch} norm={norm_name}, or choose the matching norm here.")
    body.load_state_dict(trunk)
    log.info("backbone initialised from %s (model %s, layer %s): %d tensors", path, source.get("model", "?"),
             source.get("norm", "?"), len(trunk))


def checkpoint_run(path: Path) -> dict:
    """Model and layer of the run that wrote ``path``, from its results.json when that is there."""
    try:
        record = json.loads((path.parent.parent / "results.json").read_text())
        return {"model": record["model"], "norm": record["norm"]["name"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
