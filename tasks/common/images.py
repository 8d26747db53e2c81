"""Pictures a run makes (sample grids, predictions drawn on images): a PNG in the run dir, and to wandb when on."""
from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.loggers import WandbLogger
from torchvision.io import write_png


def save_and_log_image(module, image: torch.Tensor, name: str, key: str) -> Path:
    """Write ``image`` (uint8, C x H x W) as ``<run dir>/images/<name>.png`` and log it to wandb under ``key``."""
    path = Path(module.trainer.default_root_dir) / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.detach().cpu(), str(path))
    for logger in module.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=module.global_step)
    return path
