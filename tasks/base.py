"""What every task hands the run pipeline.

A task's LightningModule may define ``record_extras() -> dict``: entries the pipeline adds to ``results.json``
after testing (e.g. BigGAN's FID of the untrained generator).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl


@dataclass
class TaskParts:
    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    model: str  # architecture name, for the result record
    dataset: str
    monitor: str  # validation metric that picks the best checkpoint; test/<same name> is the headline
    mode: str  # "max" or "min"
