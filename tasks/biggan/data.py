"""BigGAN data: real images with labels for D, fixed latents for evaluation, held-out real sets for FID.

fashion_mnist (embedded default: 28 px gray padded to 32 px, repeated to 3 channels) and cifar10 live in memory as
uint8; imagefolder (ImageNet-style ``train/``, ``val/``) is read and resized to ``resolution`` per image.
Every dataset holds out ``val_size`` training images as the validation real set; the test real set is the test split
(imagefolder: ``test/``, else ``val/``), so the checkpoint picked on validation FID is scored on other images.
Training images reach the model in [-1, 1]; real images for the feature network in [0, 1].

An epoch is ``steps_per_epoch`` G steps (each batch holds the D batches of one G step: d_steps x accumulate), so
layers compare at equal G steps and evaluation comes every epoch.
"""
from __future__ import annotations


import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset, TensorDataset, default_collate

from tasks.common.checks import require_positive
from tasks.common.datasets import (DatasetError, fixed_order, image_folder_classes, image_folder_splits,
                                  load_with_val_split)
from tasks.common.sampling import draws_for_all_ranks

SPLITS = ("val", "test")


def fashion_mnist_as_rgb32(images: torch.Tensor) -> torch.Tensor:
    return F.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


class BatchIndexed(Dataset):
    """A per-image dataset indexed by a list of indices, as a TensorDataset is: returns the collated batch."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, indices: list[int]):
        return default_collate([self.images[i] for i in indices])


def fixed_latents(n: int, z_dim: int, num_classes: int, seed: int) -> TensorDataset:
    """n latents (balanced classes, class i % num_classes) from a fixed seed: the same sampler for every G."""
    z = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(z, torch.arange(n) % num_classes)


class GanData(pl.LightningDataModule):
    def __init__(self, name: str = "fashion_mnist", root: str | None = None, download: bool = False,
                 resolution: int = 32, batch_size: int = 64, draws_per_step: int = 1, steps_per_epoch: int = 100,
                 eval_batch_size: int = 100, num_workers: int = 0, val_size: int = 5000, split_seed: int = 0,
                 fid_samples: int = 500, test_fid_samples: int = 1000, z_dim: int = 128, latent_seed: int = 1234,
                 limit_train: int | None = None):
        super().__init__()
        require_positive("task.data", batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                         eval_batch_size=eval_batch_size, val_size=val_size, limit_train=limit_train)
        self.name, self.root, self.download, self.resolution = name, root, download, resolution
        self.batch_size, self.draws_per_step, self.steps_per_epoch = batch_size, draws_per_step, steps_per_epoch
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.val_size, self.split_seed, self.limit_train = val_size, split_seed, limit_train
        self.fid_samples = {"val": fid_samples, "test": test_fid_samples}
        self.z_dim, self.latent_seed = z_dim, latent_seed
        if name in ("fashion_mnist", "cifar10"):
            self.num_classes = 10
            if resolution != 32:
                raise ValueError(f"{name} is 32 px: set task.model.resolution=32 (got {resolution})")
        elif name == "imagefolder":
            self.num_classes = len(image_folder_classes(root))
        else:
            raise ValueError(f"unknown dataset {name!r}; choose from fashion_mnist, cifar10, imagefolder")
        self.train_set: Dataset | None = None
        self.real_sets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        if self.name == "imagefolder":
            self._setup_folders()
        else:
            splits = load_with_val_split(self.name, self.root, self.download, self.val_size, self.split_seed)
            if self.name == "fashion_mnist":
                splits = [(fashion_mnist_as_rgb32(x), y) for x, y in splits]
            (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits
            self.train_set = TensorDataset(train_x[:self.limit_train], train_y[:self.limit_train])
            test_perm = fixed_order(len(test_y), self.split_seed)  # the first fid_samples span the classes
            self.real_sets = {"val": TensorDataset(val_x, val_y),
                              "test": TensorDataset(test_x[test_perm], test_y[test_perm])}
        if not len(self.train_set):
            raise DatasetError("the training split is empty; lower task.data.val_size")
        for split in SPLITS:
            if len(self.real_sets[split]) < self.fid_samples[split]:
                raise DatasetError(f"{split} holds {len(self.real_sets[split])} real images, fewer than the "
                                   f"{self.fid_samples[split]} FID samples asked for; lower the sample count")

    def _setup_folders(self):
        from torchvision import transforms as T
        size = self.resolution
        to_uint8 = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
        splits = image_folder_splits(self.root, T.Compose([T.RandomHorizontalFlip(), to_uint8]), to_uint8,
                                     self.val_size, self.split_seed)
        self.train_set = Subset(splits["train"].dataset, splits["train"].indices[:self.limit_train])
        self.real_sets = {"val": splits["val"], "test": splits["test"]}

    # --- loaders: the sampler yields a batch of indices at a time (a BatchSampler), which Lightning wraps under DDP
    # (each process takes whole batches); a plain RandomSampler it would replace, losing num_samples ------------
    def _loader(self, dataset: Dataset, sampler, batch_size: int) -> DataLoader:
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                   "pin_memory": torch.cuda.is_available()}
        if not isinstance(dataset, TensorDataset):  # a TensorDataset takes a list of indices itself
            dataset = BatchIndexed(dataset)
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                          **workers)

    def train_dataloader(self):
        per_step = self.batch_size * self.draws_per_step
        draws = draws_for_all_ranks(self, self.steps_per_epoch * per_step)  # each rank: steps_per_epoch G steps
        sampler = RandomSampler(self.train_set, num_samples=draws)
        return self._loader(self.train_set, sampler, per_step)

    def latent_loader(self, split: str) -> DataLoader:
        seed = self.latent_seed + SPLITS.index(split)
        latents = fixed_latents(self.fid_samples[split], self.z_dim, self.num_classes, seed)
        return DataLoader(latents, batch_size=self.eval_batch_size)

    def val_dataloader(self):
        return self.latent_loader("val")

    def test_dataloader(self):
        return self.latent_loader("test")

    def real_loader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The first ``fid_samples`` held-out real images of ``split`` (this rank's share): (uint8 images, labels)."""
        indices = range(rank, self.fid_samples[split], world_size)
        return self._loader(self.real_sets[split], indices, self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            images, labels = batch
            return images.float() / 127.5 - 1, labels
        return batch
