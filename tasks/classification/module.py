"""LightningModule for image classification: cross-entropy, SGD with warmup + cosine, top-1/top-5."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from evonorm import param_groups_weight_decay
from tasks.common.optim import clip_gradients


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup from ~0 to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


class ClassificationModule(pl.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int, lr: float = 0.1, momentum: float = 0.9,
                 nesterov: bool = True, weight_decay: float = 5e-4, warmup_epochs: float = 0.5,
                 label_smoothing: float = 0.0, clip_grad_norm: float | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.top_k = [k for k in (1, 5) if k <= num_classes]
        self.metrics = nn.ModuleDict({
            f"{stage}_acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("val", "test") for k in self.top_k
        })

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        for k in self.top_k:
            metric = self.metrics[f"{stage}_acc{k}"]
            metric.update(logits, y)
            self.log(f"{stage}/acc{k}", metric, on_epoch=True, prog_bar=k == 1)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, self.hparams.clip_grad_norm, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups_weight_decay(self.model, hp.weight_decay)
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, round(hp.warmup_epochs * total / max(1, self.trainer.max_epochs)))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
