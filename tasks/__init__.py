"""Task registry: each task package's ``task`` module exposes ``build(task_cfg, norm_act) -> TaskParts``.

Tasks are the packages in this folder with a ``task.py``; ``common`` holds what they share. The packages themselves
import nothing, so that their models (``tasks.maskrcnn.model`` ...) load without Hydra, Lightning or pycocotools.
"""
from __future__ import annotations

import importlib
from pathlib import Path

TASKS = tuple(sorted(p.parent.name for p in Path(__file__).parent.glob("*/task.py")))


def build_task(name: str, task_cfg, norm_act):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"tasks.{name}.task").build(task_cfg, norm_act)


def extra_config_keys(name: str) -> tuple[str, ...]:
    """The keys a task takes beyond those of its config file (``model.rpn_nms_thresh``, ...): the
    ``EXTRA_CONFIG_KEYS`` of its task module, if any."""
    return getattr(importlib.import_module(f"tasks.{name}.task"), "EXTRA_CONFIG_KEYS", ())
