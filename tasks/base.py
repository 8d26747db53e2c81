"""What every task hands the run pipeline."""
from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl


@dataclass
class TaskParts:
    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    model: str  # architecture name, for the result record
    dataset: str
    monitor: str  # validation metric that picks the best checkpoint
    mode: str  # "max" or "min"
