"""The proxy task of the layer search: small classifiers (the anchors) trained from scratch on small images, scored
on held-out training images. Needs only torch and the project's models and data readers (it runs in Ray workers).

The data is split once, in the driver: training images, a scoring split (held out: every candidate's proxy score)
and a re-rank split (held out too: the final re-rank of the best layers). The dataset's test set is never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evonorm import param_groups_weight_decay
from pipelines.checks import ConfigError
from tasks.classification.data import DATASETS
from tasks.classification.models import build_model
from tasks.classification.module import warmup_cosine
from tasks.common.datasets import load_with_val_split


@dataclass(frozen=True)
class ProxyData:
    """uint8 images (N, C, S, S) and int64 labels per split, as numpy arrays: what goes into Ray's object store
    once (numpy arrays are read from it without a copy)."""
    images: dict[str, np.ndarray]  # "train", "score", "rerank"
    labels: dict[str, np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @property
    def in_chans(self) -> int:
        return self.images["train"].shape[1]

    def batch(self, split: str, index: torch.Tensor, channels_last: bool = False) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        """Normalized float images and labels at ``index`` of ``split``."""
        x = torch.from_numpy(self.images[split][index.numpy()]).float().div_(255)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.from_numpy(self.labels[split][index.numpy()])


def load_proxy_data(dataset: str, root: str | None, image_size: int, score_size: int, rerank_size: int,
                    split_seed: int) -> ProxyData:
    """Fashion-MNIST (embedded) or CIFAR-10 (``root``), resized to ``image_size`` by area averaging;
    ``score_size + rerank_size`` images of a fixed shuffle of the training images are held out (the loader's
    validation split). The loader reads the test split too; it is dropped here, unused."""
    if dataset not in DATASETS:
        raise ConfigError(f"proxy.dataset={dataset!r}: choose from {', '.join(DATASETS)}")
    train, held_out, _test = load_with_val_split(dataset, root, False, score_size + rerank_size, split_seed)

    def resized(images: torch.Tensor) -> np.ndarray:
        small = F.adaptive_avg_pool2d(images.float(), image_size) if images.shape[-1] != image_size else images
        return small.round().clamp(0, 255).to(torch.uint8).numpy()

    images = {"train": resized(train[0]), "score": resized(held_out[0][:score_size]),
              "rerank": resized(held_out[0][score_size:])}
    labels = {"train": train[1].numpy(), "score": held_out[1][:score_size].numpy(),
              "rerank": held_out[1][score_size:].numpy()}
    info = DATASETS[dataset]
    return ProxyData(images, labels, info.mean, info.std, info.num_classes)


ANCHOR_TRAINING_KEYS = ("lr",)  # an anchor's own training settings, beside its model's


def build_anchor(spec: dict, norm_act, data: ProxyData) -> nn.Module:
    """An anchor from its spec: ``arch`` and the model's keys of conf/task/classification.yaml (and its ``lr``)."""
    kwargs = {k: v for k, v in spec.items() if k != "arch" and k not in ANCHOR_TRAINING_KEYS}
    return build_model(spec["arch"], norm_act, data.num_classes, data.in_chans, **kwargs)


class ProxyTraining:
    """One anchor trained with SGD (Nesterov), linear warmup and cosine decay over ``steps``, no weight decay on
    norm parameters; batches drawn by a generator seeded per candidate, so a retried evaluation repeats itself.
    ``channels_last``: the model is, and batches are made, channels-last (depthwise convolutions run 1.3-3x faster
    so on CPU)."""

    def __init__(self, model: nn.Module, data: ProxyData, steps: int, batch_size: int, lr: float,
                 momentum: float, weight_decay: float, warmup_steps: int, label_smoothing: float, seed: int,
                 channels_last: bool = False):
        self.model, self.data, self.steps, self.batch_size = model, data, steps, batch_size
        self.label_smoothing, self.channels_last = label_smoothing, channels_last
        self.optimizer = torch.optim.SGD(param_groups_weight_decay(model, weight_decay), lr=lr, momentum=momentum,
                                         nesterov=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup_steps, steps))
        self.generator = torch.Generator().manual_seed(seed)
        self.done = 0

    def train(self, until: int) -> float:
        """Train up to step ``until``; returns the last loss (NaN/inf: the caller rejects the layer)."""
        self.model.train()
        loss = torch.tensor(0.0)
        n = len(self.data.labels["train"])
        while self.done < until:
            x, y = self.data.batch("train", torch.randint(n, (self.batch_size,), generator=self.generator),
                                   self.channels_last)
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
            if not torch.isfinite(loss):
                return float(loss.detach())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            self.done += 1
        return float(loss.detach())

    @torch.no_grad()
    def accuracy(self, split: str, limit: int | None = None, batch_size: int = 500) -> float:
        """Top-1 on ``split`` (its first ``limit`` images), in eval mode (batch layers use running statistics)."""
        self.model.eval()
        n = min(limit or len(self.data.labels[split]), len(self.data.labels[split]))
        correct = 0
        for start in range(0, n, batch_size):
            x, y = self.data.batch(split, torch.arange(start, min(start + batch_size, n)), self.channels_last)
            correct += int((self.model(x).argmax(1) == y).sum())
        return correct / n
