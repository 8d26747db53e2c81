"""Optimizer-step helpers shared by the tasks that Lightning optimizes automatically."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


def clip_gradients(module: pl.LightningModule, optimizer, max_norm: float | None, gradient_clip_val=None,
                   gradient_clip_algorithm=None) -> None:
    """A task's ``configure_gradient_clipping``: log the gradients' global norm before clipping as
    ``train/grad_norm`` (what a divergence looks like from the inside), then clip it to the task's ``max_norm``
    (None or 0: no clipping); ``trainer.gradient_clip_val`` wins when given."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        module.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)
    clip = gradient_clip_val or max_norm
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")
