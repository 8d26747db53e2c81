"""Pictures a run makes (sample grids, predictions drawn on images): a PNG in the run dir, and to wandb when on."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from pytorch_lightning.loggers import WandbLogger
from torchvision.io import write_png
from torchvision.transforms.functional import pil_to_tensor

CAPTION_HEIGHT = 14


def save_and_log_image(module, image: torch.Tensor, name: str, key: str) -> Path:
    """Write ``image`` (uint8, C x H x W) as ``<run dir>/images/<name>.png`` and log it to wandb under ``key``."""
    path = Path(module.trainer.default_root_dir) / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.detach().cpu(), str(path))
    for logger in module.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=module.global_step)
    return path


def with_caption(image: torch.Tensor, text: str) -> torch.Tensor:
    """``image`` (uint8, 3 x H x W) above a white strip with ``text`` in black."""
    strip = Image.new("RGB", (image.shape[-1], CAPTION_HEIGHT), "white")
    ImageDraw.Draw(strip).text((3, 1), text, fill="black")
    return torch.cat([image, pil_to_tensor(strip)], dim=-2)
