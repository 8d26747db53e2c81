"""Builds the classification task's parts from its config (the registry entry; imports the training stack)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from tasks.base import TaskParts
from tasks.common.library_models import model_name

from .data import ClassificationData
from .models import build_model
from .module import ClassificationModule


def build(cfg: DictConfig, norm_act) -> TaskParts:
    data = ClassificationData(**OmegaConf.to_container(cfg.data, resolve=True))
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    arch = model_kwargs.pop("arch")
    model = build_model(arch, norm_act, data.info.num_classes, data.info.in_chans, **model_kwargs)
    module = ClassificationModule(model, data.info.num_classes, **OmegaConf.to_container(cfg.optim, resolve=True))
    return TaskParts(module, data, model=model_name(arch, model_kwargs.get("kwargs")), dataset=cfg.data.name,
                     monitor="val/acc1", mode="max", compile_targets=("model",))

