"""Dataset readers shared by the tasks: Fashion-MNIST IDX files (the embedded default), CIFAR-10 and ImageNet-style
folders.

Every failure is a ``DatasetError`` whose message says how to get the data.
"""
from __future__ import annotations

import copy
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset
from torchvision.datasets import CIFAR10, FashionMNIST, ImageFolder

from tasks.common.checks import first_of

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


class DatasetError(RuntimeError):
    """A dataset that is missing or unreadable; the message says how to get it."""


# --- IDX (Fashion-MNIST) -------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}; the file is damaged, get a fresh copy") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file (bad magic number); get a fresh copy")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(raw) - header != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: header says shape {shape}, the file holds "
                           f"{len(raw) - header} values; get a fresh copy")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(root: str | None, download: bool = False, root_key: str = "task.data.root",
                       download_key: str | None = "task.data.download"):
    """Fashion-MNIST as uint8 (train images, train labels, test images, test labels); when it is missing the error
    names the calling task's overrides ``root_key`` and ``download_key`` (None: that task cannot download)."""
    roots = [Path(root).expanduser()] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    for r in roots:
        paths = {k: find_idx(r, stem) for k, stem in FASHION_MNIST_FILES.items()}
        if all(paths.values()):
            break
    else:
        if download and root:
            try:
                for train in (True, False):
                    FashionMNIST(root, train=train, download=True)
            except (OSError, RuntimeError) as e:
                raise DatasetError(f"downloading Fashion-MNIST into {root} failed ({e}); without network, "
                                   "`apt-get install dataset-fashion-mnist` or copy the IDX files there") from e
            return load_fashion_mnist(root)
        fetch = f"; with network access, {root_key}=<folder> {download_key}=true fetches them" if download_key else ""
        raise DatasetError(
            f"Fashion-MNIST not found in {', '.join(map(str, roots))}. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX files "
            f"(train-images-idx3-ubyte.gz, ...) in a folder and pass {root_key}=<folder>{fetch}.")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DatasetError(f"Fashion-MNIST {split} images and labels differ in count in {r}")
    as_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # noqa: E731 - (N, 1, 28, 28) uint8
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return (as_images(arrays["train_images"]), as_labels(arrays["train_labels"]),
            as_images(arrays["test_images"]), as_labels(arrays["test_labels"]))


def load_cifar10(root: str | None, download: bool = False):
    if not root:
        raise DatasetError("cifar10 needs task.data.root=<folder holding cifar-10-batches-py> (torchvision's layout)")
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(root, train=train, download=download)
        except (OSError, RuntimeError) as e:
            raise DatasetError(f"CIFAR-10 not found, corrupted or not downloadable in {root} ({e}). Put the "
                               "extracted cifar-10-batches-py folder there, or add task.data.download=true with "
                               "network access.") from e
        splits += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)]
    return tuple(splits)


# --- splits shared by the tasks ----------------------------------------------------------------------------------

def fixed_order(n: int, seed: int) -> torch.Tensor:
    """A random order of ``n`` items fixed by ``seed``: every task and layer sees the same split and subsets."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def load_with_val_split(name: str, root: str | None, download: bool, val_size: int, split_seed: int):
    """Fashion-MNIST or CIFAR-10 as uint8 (images, labels) pairs for train, val and test; val is ``val_size``
    training images held out with a fixed ``split_seed``, so every task and layer sees the same split."""
    loader = {"fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}[name]
    train_x, train_y, test_x, test_y = loader(root, download)
    perm = fixed_order(len(train_y), split_seed)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return (train_x[train_idx], train_y[train_idx]), (train_x[val_idx], train_y[val_idx]), (test_x, test_y)


def image_folder_dirs(root: str | None) -> dict[str, Path]:
    """An ImageNet-style folder's train/, val/ and test/ (val/ when there is no test/) class folders."""
    train = Path(root or "") / "train"
    if not root or not train.is_dir():
        raise DatasetError(f"imagefolder needs task.data.root=<folder with train/ and val/ class folders>; "
                           f"{train} is not a directory")
    val = Path(root) / "val"
    if not val.is_dir():
        raise DatasetError(f"imagefolder needs {val} (class folders as in train/)")
    test = Path(root) / "test"
    return {"train": train, "val": val, "test": test if test.is_dir() else val}


def image_folder_classes(root: str | None) -> list[str]:
    train = image_folder_dirs(root)["train"]
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train} holds no class folders")
    return classes


class ClassFolder(ImageFolder):
    """An image-folder split labelled with train/'s classes: torchvision numbers each split's own class folders, so
    a val/ without one of train/'s classes would shift the labels after it. A class train/ lacks is an error."""

    def __init__(self, folder: Path, classes: list[str], transform=None, every_class: bool = False):
        """``every_class``: each class folder must hold an image (train/'s do; a val/ may lack a class)."""
        self.train_classes = classes
        super().__init__(str(folder), transform, allow_empty=not every_class)
        if not self.samples:
            raise DatasetError(f"{folder} holds no images in class folders ({first_of(classes)}); put "
                               "each image in the folder of its class, as in train/")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        unknown = sorted({e.name for e in os.scandir(directory) if e.is_dir()} - set(self.train_classes))
        if unknown:
            raise DatasetError(f"{directory} has class folders that train/ lacks ({first_of(unknown)}): a model "
                               "trained on train/ cannot predict them; remove them or add them to train/")
        return self.train_classes, {c: i for i, c in enumerate(self.train_classes)}


def image_folder_splits(root: str | None, train_transform, eval_transform, val_size: int,
                        split_seed: int) -> dict[str, Subset]:
    """An ImageNet-style folder's splits, labelled with train/'s classes: train/ less ``val_size`` images held out
    (fixed by ``split_seed``) for training, the held-out ones (``eval_transform``) for validation, which picks the
    best checkpoint, and test/ (else val/) for the test. Each in an order fixed by ``split_seed``: files are listed
    class by class, and the first N images of a split should span its classes."""
    dirs, classes = image_folder_dirs(root), image_folder_classes(root)
    train = ClassFolder(dirs["train"], classes, train_transform, every_class=True)
    if val_size >= len(train):
        raise DatasetError(f"{dirs['train']} holds {len(train)} images, not more than task.data.val_size={val_size} "
                           "(held out for validation); lower task.data.val_size")
    held_out = copy.copy(train)  # the same file list, read without the training augmentation
    held_out.transform = eval_transform
    test = ClassFolder(dirs["test"], classes, eval_transform)
    order = fixed_order(len(train), split_seed).tolist()
    return {"train": Subset(train, order[val_size:]), "val": Subset(held_out, order[:val_size]),
            "test": Subset(test, fixed_order(len(test), split_seed).tolist())}
