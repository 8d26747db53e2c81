"""Task registry: each task package exposes ``build(task_cfg, norm_act) -> TaskParts``.

Tasks are the packages in this folder that define ``build``; ``common`` holds what they share.
"""
from __future__ import annotations

import importlib
from pathlib import Path

TASKS = tuple(sorted(p.parent.name for p in Path(__file__).parent.glob("*/__init__.py") if p.parent.name != "common"))


def build_task(name: str, task_cfg, norm_act):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"tasks.{name}").build(task_cfg, norm_act)
