"""Mask R-CNN with FPN from torchvision's detection parts, with the chosen norm-act layer at every norm position.

Our parts: the pre-activation ResNet backbone (C2..C5, each followed by a norm-act because pre-activation stage
outputs are un-normalized sums) or a torchvision / timm classifier converted to the layer and cut into its feature
maps at strides 4 to 32 (``tasks.common.library_models``), the FPN's lateral/output convs (``norm_act(apply_act=False)``: no activation
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
from tasks.common.library_models import feature_extractor, is_library_arch, library_model, model_name
from tasks.common.weights import WeightsError, load_weights, read_weights

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


class LibraryFPNBackbone(nn.Module):
    """A torchvision or timm classifier converted to the layer, cut into its feature maps at strides 4 to 32
    (``feature_extractor``) -> FPN (P2..P5, plus P6 by max-pooling). Post-activation networks: no norm is added."""

    def __init__(self, arch: str, norm_act: NormAct, fpn_norm: NormAct | None, fpn_channels: int,
                 kwargs: dict | None = None, weights: str | None = None):
        super().__init__()
        classifier = library_model(arch, norm_act, 1000, 3, weights, kwargs, weights_key="task.model.backbone_ckpt")
        self.body, channels = feature_extractor(classifier)
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=fpn_norm and partial(fpn_norm, apply_act=False))
        self.out_channels = fpn_channels

    def forward(self, x):
        return self.fpn(self.body(x))


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
                   freeze_norm_stats: bool = False, backbone_ckpt: str | None = None, kwargs: dict | None = None,
                   **detector_kwargs) -> MaskRCNN:
    """``num_classes`` counts the background. ``train_sizes``: shorter-side sizes drawn at random per training
    image (multi-scale training); evaluation resizes to ``test_size``. ``roi_sampling_ratio``: bilinear samples
    per RoIAlign bin side (torchvision's 2; 0: adaptive, as detectron2). ``detector_kwargs`` go to torchvision's
    ``MaskRCNN`` (RPN/RoI sampling and post-processing: ``rpn_batch_size_per_image``, ``box_detections_per_img``,
    ...). ``arch``: a pre-activation ResNet, or a classifier of torchvision or timm (``torchvision:<name>``,
    ``timm:<name>``; ``kwargs`` go to its constructor). ``backbone_ckpt``: a ``task=classification`` checkpoint of
    the same arch and layer, or (library archs) the library model's weights file."""
    library = is_library_arch(arch)
    if not library and arch not in DETECTION_BACKBONES:
        raise ValueError(f"unknown detection backbone {arch!r}; choose from {', '.join(DETECTION_BACKBONES)}, or a "
                         "classifier of torchvision or timm as torchvision:<name> or timm:<name>")
    if kwargs and not library:
        raise ValueError(f"task.model.kwargs={kwargs} go to a torchvision or timm model's constructor, not {arch}'s")
    norm_name = layer_name(norm_act)
    where = placement(norm_name, list(norm_in))
    chosen = lambda pos: None if where[pos] == "none" else (  # noqa: E731
        norm_act if where[pos] == norm_name else evonorm.norm_act_factory(where[pos]))
    if backbone_ckpt:
        check_backbone_source(Path(backbone_ckpt).expanduser(), model_name(arch, kwargs), where["backbone"])
    if library:
        backbone = LibraryFPNBackbone(arch, chosen("backbone"), chosen("fpn"), fpn_channels, kwargs, backbone_ckpt)
    else:
        backbone = ResNetFPNBackbone(arch, chosen("backbone"), chosen("fpn"), fpn_channels)
        if backbone_ckpt:
            load_backbone(backbone.body, backbone_ckpt)
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


def check_backbone_source(path: Path, model: str, norm_name: str) -> None:
    """Refuse a classification checkpoint of another architecture or layer (says its run's results.json)."""
    source = checkpoint_run(path)
    if any(value is not None and value != ours for value, ours in ((source.get("model"), model),
                                                                   (source.get("norm"), norm_name))):
        raise BackboneCheckpointError(
            f"backbone checkpoint {path} comes from a run of model {source.get('model', '?')}, layer "
            f"{source.get('norm', '?')}; this backbone is model {model}, layer {norm_name}: start it from a "
            "classification run of this model and layer, or build the backbone as that run's (task.model.arch, "
            "norm)")


def load_backbone(body: nn.Module, ckpt_path: str) -> None:
    """Initialise the pre-activation trunk from a ``task=classification`` checkpoint (its classifier left out; an
    input conv of other channels adapted, as for the 1-channel Fashion-MNIST stem in a 3-channel detector)."""
    state = read_weights(ckpt_path, "task.model.backbone_ckpt")
    try:
        load_weights(body, state, f"backbone checkpoint {ckpt_path}", ignored=[k for k in state if
                                                                             k.startswith("head.")])
    except WeightsError as e:
        raise BackboneCheckpointError(str(e)) from e


def checkpoint_run(path: Path) -> dict:
    """Model and layer of the run that wrote ``path``, from its results.json when that is there."""
    try:
        record = json.loads((path.parent.parent / "results.json").read_text())
        return {"model": record["model"], "norm": record["norm"]["name"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
