"""Builds the maskrcnn task's parts from its config (the registry entry; imports the training stack)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from tasks.base import TaskParts

from tasks.common.library_models import model_name

from .data import DetectionData
from .model import DETECTOR_KWARGS, build_maskrcnn
from .module import MaskRCNNModule

EXTRA_CONFIG_KEYS = tuple(f"model.{k}" for k in DETECTOR_KWARGS)  # beyond conf/task/maskrcnn.yaml's


def build(cfg: DictConfig, norm_act) -> TaskParts:
    data = DetectionData(steps=cfg.steps, epochs=cfg.epochs, **OmegaConf.to_container(cfg.data, resolve=True))
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_maskrcnn(norm_act, num_classes=len(data.category_ids) + 1, **model_kwargs)
    module = MaskRCNNModule(model, data.category_ids, data.class_names,
                            **OmegaConf.to_container(cfg.optim, resolve=True))
    return TaskParts(module, data, model=f"maskrcnn_{model_name(model_kwargs['arch'], model_kwargs['kwargs'])}_fpn", dataset=data.name,
                     monitor="val/segm_AP", mode="max",
                     compile_targets=("model.backbone",))  # RPN/RoI sampling and post-processing: data-dependent
