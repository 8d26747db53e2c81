"""``fashion_scenes``: the embedded COCO-format instance-segmentation set, generated once and cached.

Real Fashion-MNIST items (train items for the train split, test items for val) pasted at random scales and
positions onto random crops of the real photos bundled with scikit-image and scikit-learn. An item's instance mask
is its thresholded silhouette, minus what later items cover; its box comes from that mask; 10 categories (the
Fashion-MNIST classes); COCO JSON with RLE masks. Everything follows from the seed and the sizes, which name the
cache folder: ``<cache root>/fashion_scenes/<key>/{train,val}/*.png`` and ``annotations/instances_{split}.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.io import write_png

from tasks.common.datasets import DatasetError, load_fashion_mnist

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the generator changes: it is part of the cache key
CACHE_ENV = "EVONORM_DATA_CACHE"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "brick", "grass", "gravel",
                  "hubble_deep_field", "moon", "page", "text", "immunohistochemistry", "retina", "clock")
ITEM_THRESHOLD = 24  # Fashion-MNIST pixels above this belong to the item (its background is 0)
MIN_VISIBLE = 0.5  # an item more than half covered by later items is dropped from the scene
PHOTO_SIDE = 512
NEGATIVE_FRACTION = 0.05  # images with no item: negatives, as real sets have


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/evonorm-transfer"
    return Path(root).expanduser()


def scene_params(seed: int, image_size: int, num_train: int, num_val: int, max_items: int,
                 item_scale: tuple[float, float]) -> dict:
    return {"version": FORMAT_VERSION, "seed": seed, "image_size": image_size, "num_train": num_train,
            "num_val": num_val, "max_items": max_items, "item_scale": list(item_scale)}


def ensure_fashion_scenes(cache_dir: str | None = None, fashion_root: str | None = None, seed: int = 0,
                          image_size: int = 128, num_train: int = 4000, num_val: int = 200, max_items: int = 4,
                          item_scale: tuple[float, float] = (0.25, 0.6)) -> Path:
    """The folder of the set with these parameters; generated (with a log line) when not cached yet."""
    params = scene_params(seed, image_size, num_train, num_val, max_items, item_scale)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root(cache_dir) / "fashion_scenes" / f"s{seed}-{image_size}px-{num_train}-{num_val}-{key}"
    if (folder / "params.json").is_file():
        return folder
    log.info("generating fashion_scenes (%d train + %d val images, %d px, seed %d) into %s", num_train, num_val,
             image_size, seed, folder)
    start = time.time()
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_items, train_labels, test_items, test_labels = load_fashion_mnist(
        fashion_root, root_key="task.data.fashion_root", download_key=None)  # this task has no download key
    try:  # after the load, so that a missing Fashion-MNIST leaves no empty folder behind
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DatasetError(f"cannot create the fashion_scenes cache under {cache_root(cache_dir)} ({e}); point "
                           f"task.data.cache_dir=<folder> (or {CACHE_ENV}) at a writable folder") from e
    photos = load_photos()
    rng = np.random.default_rng(seed)
    for split, count, items, labels in (("train", num_train, train_items, train_labels),
                                        ("val", num_val, test_items, test_labels)):
        split_seed = rng.integers(2**63)
        coco = generate_split(tmp / split, count, items[:, 0].numpy(), labels.numpy(), photos, image_size,
                              max_items, item_scale, np.random.default_rng(split_seed))
        (tmp / "annotations").mkdir(parents=True, exist_ok=True)
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (tmp / "params.json").write_text(json.dumps(params, indent=1))
    try:
        tmp.rename(folder)  # atomic: a reader never sees half a set
    except OSError:  # another process finished the same set first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fashion_scenes ready in %.1f s", time.time() - start)
    return folder


def load_photos() -> list[torch.Tensor]:
    """The bundled real photos as float 3 x H x W tensors in [0, 255] (gray ones repeated to three channels)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS] + list(load_sample_images().images)
    photos = []
    for a in arrays:
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
        photo = torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1)
        scale = min(1.0, PHOTO_SIDE / min(photo.shape[1:]))  # big photos shrunk once: crops are resized anyway
        photos.append(F.interpolate(photo[None], scale_factor=scale, mode="bilinear", antialias=True)[0])
    return photos


def random_background(photos, size: int, rng: np.random.Generator) -> torch.Tensor:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[1:]
    crop = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    patch = photo[:, top:top + crop, left:left + crop][None]
    image = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if rng.random() < 0.5:
        image = image.flip(-1)
    return image


def generate_split(folder: Path, count: int, items: np.ndarray, labels: np.ndarray, photos, size: int,
                   max_items: int, item_scale: tuple[float, float], rng: np.random.Generator) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas = random_background(photos, size, rng)
        instances = []  # label, visible mask, area when pasted
        for _ in range(0 if rng.random() < NEGATIVE_FRACTION else int(rng.integers(1, max_items + 1))):
            index = int(rng.integers(len(items)))
            side = max(8, int(round(size * rng.uniform(*item_scale))))
            item = F.interpolate(torch.from_numpy(items[index]).float()[None, None], size=(side, side),
                                 mode="bilinear", align_corners=False)[0, 0]
            silhouette = item > ITEM_THRESHOLD
            top, left = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
            colour = torch.from_numpy(rng.uniform(0.2, 1.0, 3)).float()[:, None, None] * 255
            texture = (0.3 + 0.7 * item / 255)[None] * colour
            region = canvas[:, top:top + side, left:left + side]
            canvas[:, top:top + side, left:left + side] = torch.where(silhouette, texture, region)
            pasted = torch.zeros(size, size, dtype=torch.bool)
            pasted[top:top + side, left:left + side] = silhouette
            for instance in instances:
                instance["mask"] &= ~pasted
            instances.append({"label": int(labels[index]), "mask": pasted, "area": int(pasted.sum())})
            instances = [i for i in instances if i["area"] and i["mask"].sum() >= MIN_VISIBLE * i["area"]]
        name = f"{image_id:06d}.png"
        write_png(canvas.round().clamp(0, 255).to(torch.uint8), str(folder / name), compression_level=1)
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        for instance in instances:
            rle = mask_utils.encode(np.asfortranarray(instance["mask"].numpy().astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": instance["label"] + 1,
                                "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": bbox,
                                "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(CLASSES)]
    return {"info": {"description": "fashion_scenes: Fashion-MNIST items on real photos (generated)"},
            "images": images, "annotations": annotations, "categories": categories}
