"""Classification data: Fashion-MNIST (embedded default), CIFAR-10 and ImageNet-style folders.

The small sets live in memory as uint8 tensors; batches are normalized and augmented after the transfer to the
device (random crop with padding, horizontal flip), which is far faster on a 2-core machine than per-image
transforms in worker processes, and upsampled there to ``resize`` px where asked (ImageNet networks, which
downsample 32-fold, end on a 1x1 map at 28 px).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tasks.common.checks import require_positive
from tasks.common.datasets import DatasetError, image_folder_classes, image_folder_splits, load_with_val_split

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple
    std: tuple
    crop_padding: int = 0


DATASETS = {
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), crop_padding=2),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_padding=4),
}


# --- in-memory datasets and batch transforms ------------------------------------------------------------------

class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) and labels, fetched a whole batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]


def keep_batch(batch):
    return batch


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop from a zero-padded batch, and random horizontal flips."""
    n, c, h, w = x.shape
    if padding:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), generator=generator).to(x.device)
        rows = dy + torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = dx + torch.arange(w, device=x.device).view(1, 1, 1, w)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1),
                   torch.arange(c, device=x.device).view(1, c, 1, 1), rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


class ClassificationData(pl.LightningDataModule):
    def __init__(self, name: str = "fashion_mnist", root: str | None = None, download: bool = False,
                 batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0, val_size: int = 5000,
                 split_seed: int = 0, augment: bool = True, limit_train: int | None = None,
                 limit_eval: int | None = None, image_size: int = 224, resize: int | None = None):
        super().__init__()
        require_positive("task.data", batch_size=batch_size, eval_batch_size=eval_batch_size, val_size=val_size,
                         limit_train=limit_train, limit_eval=limit_eval, resize=resize)
        if resize is not None and name == "imagefolder":
            raise ValueError(f"task.data.resize={resize} upsamples the in-memory sets; image folders are read at "
                             "task.data.image_size")
        self.resize = resize
        self.name, self.root, self.download = name, root, download
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_size, self.split_seed, self.augment = val_size, split_seed, augment
        self.limit_train, self.limit_eval = limit_train, limit_eval
        if name in DATASETS:
            self.info = DATASETS[name]
        elif name == "imagefolder":
            self.info = DatasetInfo(len(image_folder_classes(self.root)), 3, image_size, IMAGENET_MEAN, IMAGENET_STD)
        else:
            raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS) + ['imagefolder']}")
        self.splits: dict[str, Dataset] = {}

    # every dataset holds out val_size training images (fixed split_seed) for validation, which picks the best
    # checkpoint; the test split is the dataset's own (imagefolder: test/, else val/)
    def setup(self, stage: str | None = None):
        if self.splits:
            return
        if self.name == "imagefolder":
            self._setup_folders()
        else:
            parts = load_with_val_split(self.name, self.root, self.download, self.val_size, self.split_seed)
            self.splits = {split: InMemoryImages(*part) for split, part in zip(("train", "val", "test"), parts)}
        for split, limit in (("train", self.limit_train), ("val", self.limit_eval), ("test", self.limit_eval)):
            if limit is not None and limit < len(self.splits[split]):
                self.splits[split] = Subset(self.splits[split], range(limit))
        processes = self.trainer.world_size if self.trainer is not None else 1
        if len(self.splits["train"]) < self.batch_size * processes:  # smaller batches are dropped: no step would run
            raise DatasetError(f"the training split holds {len(self.splits['train'])} images, fewer than one batch "
                               f"(task.data.batch_size={self.batch_size}) for each of {processes} process(es); lower "
                               "task.data.batch_size or task.data.val_size, or raise task.data.limit_train")

    def _setup_folders(self):
        from torchvision import transforms as T
        size = self.info.image_size
        norm = T.Normalize(self.info.mean, self.info.std)
        eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]) \
            if self.augment else eval_tf
        self.splits = image_folder_splits(self.root, train_tf, eval_tf, self.val_size, self.split_seed)

    def _loader(self, split: str, train: bool) -> DataLoader:
        in_memory = self.name != "imagefolder"
        return DataLoader(self.splits[split], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, drop_last=train, num_workers=self.num_workers,
                          collate_fn=keep_batch if in_memory else None,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, labels = batch
        if images.dtype != torch.uint8:  # image folders arrive normalized
            return images, labels
        mean = torch.tensor(self.info.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=images.device).view(1, -1, 1, 1)
        x = images.float() / 255
        if self.trainer is not None and self.trainer.training and self.augment:
            x = random_crop_flip(x, self.info.crop_padding)  # before normalizing: pads with black
        if self.resize is not None and x.shape[-2:] != (self.resize, self.resize):
            x = torch.nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=False)
        return (x - mean) / std, labels
