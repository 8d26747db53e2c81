"""Task registry: each task package exposes ``build(task_cfg, norm_act) -> TaskParts``."""
from __future__ import annotations

import importlib

TASKS = ("classification",)


def build_task(name: str, task_cfg, norm_act):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"tasks.{name}").build(task_cfg, norm_act)
