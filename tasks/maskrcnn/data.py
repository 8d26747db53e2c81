"""COCO-format instance-segmentation data: any set by path, or the embedded generated ``fashion_scenes``.

Read with torchvision's ``CocoDetection`` + ``wrap_dataset_for_transforms_v2`` (polygons or RLE to masks) and
transforms v2. Category ids map to contiguous labels 1..K (0 is the background). Crowd regions and degenerate
annotations (box under a pixel, empty mask) are dropped before training with a logged count; images without
annotations stay as negatives. A file with missing fields or dangling ids, nothing to train on or nothing to
evaluate against is a ``DatasetError`` before training; an image that fails to decode, one at the step that reads it.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from tasks.common.checks import first_of, require_positive
from tasks.common.datasets import DatasetError
from tasks.common.sampling import draws_for_all_ranks

from .scenes import ensure_fashion_scenes

log = logging.getLogger(__name__)
TARGET_KEYS = ("image_id", "boxes", "masks", "labels")


@dataclass
class Split:
    images: Path
    annotations: Path
    name: str  # train or val: the task.data.<name>_images / <name>_ann keys that give it


def read_coco(split: Split) -> CocoDetection:
    """``CocoDetection`` over ``split``, with errors that name the file at fault."""
    if not split.annotations.is_file():
        raise DatasetError(f"annotation file {split.annotations} not found; give task.data.{split.name}_ann="
                           "<instances JSON> (COCO format)")
    if not split.images.is_dir():
        raise DatasetError(f"image folder {split.images} not found; give task.data.{split.name}_images=<folder>")
    try:
        content = json.loads(split.annotations.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"annotation file {split.annotations} is not valid JSON ({e}); fix or regenerate "
                           "it") from e
    check_coco_entries(content, split.annotations)
    dataset = CocoDetection(str(split.images), str(split.annotations))
    missing = [info["file_name"] for info in dataset.coco.imgs.values()
               if not (split.images / info["file_name"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} images listed in {split.annotations} are missing from {split.images}, "
                           f"e.g. {split.images / missing[0]}")
    return dataset


def bad_fields(entry, needs: tuple[str, ...]) -> list[str]:
    """The fields of ``needs`` that ``entry`` lacks or holds a wrong type in (ids become dict keys)."""
    if not isinstance(entry, dict):
        return ["not an object"]
    valid = {"height": is_size, "width": is_size, "file_name": lambda v: isinstance(v, str),
             "name": lambda v: isinstance(v, (str, int)) and not isinstance(v, bool)}  # a label, drawn as text
    return [k for k in needs if k not in entry or not valid.get(k, is_id)(entry[k])]


def is_id(value) -> bool:  # pycocotools takes a string id for a list of ids (its characters)
    return isinstance(value, int) and not isinstance(value, bool)


def is_size(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def entry_name(index: int, entry) -> str:
    return f"id {entry['id']}" if isinstance(entry, dict) and is_id(entry.get("id")) else f"entry #{index}"


def check_coco_entries(content, path: Path) -> None:
    """Raise a ``DatasetError`` naming the entries of a COCO instances file that would otherwise fail later with
    a bare KeyError (some only at the training step that reaches them) or make an empty set."""
    if not isinstance(content, dict):
        raise DatasetError(f"{path} is not COCO instances format: the top level must be an object with images, "
                           "annotations and categories")
    images, categories = content.get("images"), content.get("categories")
    annotations = content.get("annotations", [])
    if not isinstance(images, list) or not images:
        raise DatasetError(f"{path} lists no images: it needs a non-empty \"images\" list of "
                           "{id, file_name, height, width}")
    if not isinstance(categories, list) or not categories:
        raise DatasetError(f"{path} lists no categories: it needs a non-empty \"categories\" list of {{id, name}}")
    if not isinstance(annotations, list):
        raise DatasetError(f"{path}: \"annotations\" must be a list of {{id, image_id, category_id, bbox, "
                           f"segmentation}}, not {type(annotations).__name__}")
    problems = []
    for kind, entries, needs in (("images", images, ("id", "file_name", "height", "width")),
                                 ("categories", categories, ("id", "name")),
                                 ("annotations", annotations, ("id", "image_id", "category_id"))):
        bad = [f"{entry_name(i, e)} ({', '.join(faults)})" for i, e in enumerate(entries)
               if (faults := bad_fields(e, needs))]
        if bad:
            problems.append(f"{len(bad)} {kind} with a missing or bad field: {first_of(bad)}")
    if problems:  # the cross-references below need these fields
        raise DatasetError(f"{path} has incomplete entries; add or fix the fields named (ids: integers, "
                           f"height and width: positive): {'; '.join(problems)}")
    for kind, entries in (("images", images), ("categories", categories), ("annotations", annotations)):
        # pycocotools keeps the last entry of an id: the others would vanish without a word
        repeated = sorted((i for i, n in Counter(e["id"] for e in entries).items() if n > 1), key=str)
        if repeated:
            problems.append(f"{len(repeated)} {kind} ids are used more than once ({first_of(repeated)}): give every "
                            "entry its own id")
    for field, known, fix in (("image_id", {e["id"] for e in images}, "add those images"),
                              ("category_id", {e["id"] for e in categories}, "add those categories")):
        strays = [a for a in annotations if a[field] not in known]
        if strays:
            problems.append(f"{len(strays)} annotations name a {field} that is not listed (annotation ids "
                            f"{first_of([a['id'] for a in strays])} with {field} "
                            f"{first_of(sorted({a[field] for a in strays}, key=str))}): {fix} or fix or delete the "
                            "annotations")
    if problems:
        raise DatasetError(f"{path}: {'; '.join(problems)}")


def annotated_size_faults(coco: CocoDetection, image_ids) -> list[str]:
    """Images among ``image_ids`` whose file is not the annotated height x width (or cannot be read): COCOeval
    rasterises ground truth at the annotated size and predictions at the real one, and fails on the pair."""
    faults = []
    for image_id in image_ids:
        info = coco.coco.imgs[image_id]
        try:
            with Image.open(Path(coco.root) / info["file_name"]) as image:  # reads the header only
                width, height = image.size
        except OSError as e:
            faults.append(f"{info['file_name']} cannot be read ({e})")
            continue
        if (height, width) != (info["height"], info["width"]):
            faults.append(f"{info['file_name']} is {height}x{width}, annotated {info['height']}x{info['width']}")
    return faults


def drop_unusable_annotations(dataset: CocoDetection, where: Path, keep_crowd: bool) -> dict[str, int]:
    """Remove degenerate annotations (and crowd regions unless ``keep_crowd``: COCOeval uses them as ignore
    regions) from the images' lists, which both loading and COCOeval read; returns how many of each went."""
    dropped = {"crowd": 0, "degenerate": 0}
    for image_id, anns in dataset.coco.imgToAnns.items():
        info = dataset.coco.imgs[image_id]
        keep = []
        for a in anns:
            if not keep_crowd and a.get("iscrowd", 0):
                dropped["crowd"] += 1
            elif not well_formed(a, info["height"], info["width"]):
                dropped["degenerate"] += 1
            else:
                keep.append(a)
        dataset.coco.imgToAnns[image_id] = keep
    if any(dropped.values()):
        log.warning("%s: dropped %s", where, describe_dropped(dropped))
    return dropped


def fill_eval_fields(dataset: CocoDetection, where: Path) -> None:
    """COCOeval reads every annotation's ``iscrowd`` and ``area`` (the object size ranges); files made by other
    tools may omit them: take 0 and the mask's area (COCO's own meaning), and say how many were filled."""
    filled = Counter()
    for anns in dataset.coco.imgToAnns.values():
        for a in anns:
            if "iscrowd" not in a:
                a["iscrowd"] = 0
                filled["iscrowd"] += 1
            if "area" not in a:
                a["area"] = float(mask_utils.area(dataset.coco.annToRLE(a)))
                filled["area"] += 1
    if filled:
        log.warning("%s: %d annotations without iscrowd taken as 0 (not crowd), %d without area given their mask's "
                    "area", where, filled["iscrowd"], filled["area"])


def describe_dropped(dropped: dict[str, int]) -> str:
    return (f"{dropped['crowd']} crowd regions (iscrowd=1) and {dropped['degenerate']} degenerate annotations "
            "(box under 1 px, empty or malformed segmentation)")


def ground_truth_count(coco, image_ids) -> int:
    """Annotations COCOeval can match on these images (crowd regions only mark areas to ignore)."""
    return sum(not a.get("iscrowd", 0) for i in image_ids for a in coco.imgToAnns.get(i, ()))


def well_formed(ann: dict, height: int, width: int) -> bool:
    x, y, w, h = ann.get("bbox", (0, 0, 0, 0))
    seg = ann.get("segmentation")
    if w < 1 or h < 1 or not seg:
        return False
    if isinstance(seg, list):  # polygons: each needs three points inside the image
        return all(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
    return isinstance(seg, dict) and "counts" in seg and list(seg.get("size", ())) == [height, width]


class DetectionDataset(torch.utils.data.Dataset):
    """(image float 3 x H x W in [0, 1], target with boxes, labels 1..K, masks, image_id) from a COCO set."""

    def __init__(self, coco: CocoDetection, transforms: v2.Transform, label_of: dict[int, int],
                 target_keys: tuple[str, ...] = TARGET_KEYS):
        self.coco, self.label_of = coco, label_of
        self.wrapped = wrap_dataset_for_transforms_v2(coco, target_keys=target_keys)
        self.transforms = transforms

    def __len__(self):
        return len(self.wrapped)

    def __getitem__(self, index):
        info = self.coco.coco.imgs[self.coco.ids[index]]
        try:
            image, target = self.wrapped[index]
        except OSError as e:  # PIL's truncated or unidentified image; its message does not name the file
            raise DatasetError(f"image {Path(self.coco.root) / info['file_name']} (image id {info['id']}) cannot "
                               f"be decoded ({e}); replace the file, or delete that image and its annotations "
                               "from the annotation file") from e
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image) if not isinstance(image, torch.Tensor)
                                 else image)
        size = tuple(image.shape[-2:])
        if size != (info["height"], info["width"]):  # masks would be drawn on a canvas of another size
            raise DatasetError(f"image {Path(self.coco.root) / info['file_name']} (image id {info['id']}) is "
                               f"{size[0]}x{size[1]} but annotated {info['height']}x{info['width']}; fix its height "
                               "and width in the annotation file")
        if "boxes" not in target:  # an image without annotations: a negative
            target.update(boxes=tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size),
                          masks=tv_tensors.Mask(torch.zeros(0, *size, dtype=torch.uint8)),
                          labels=torch.zeros(0, dtype=torch.int64))
        else:
            target["labels"] = torch.tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
        image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


class StepSampler(Sampler[int]):
    """``steps_per_epoch x batch_size`` indices per epoch, walking seeded permutations of the whole set.

    Makes a run step-based: every layer trains the same number of steps, and an "epoch" is a validation period.
    """

    def __init__(self, size: int, samples_per_epoch: int, seed: int):
        self.size, self.samples, self.seed, self.epoch = size, samples_per_epoch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.samples

    def __iter__(self):
        start = self.epoch * self.samples
        order = []
        for rank in range(start // self.size, (start + self.samples - 1) // self.size + 1):
            order.append(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + rank)))
        offset = start - (start // self.size) * self.size
        return iter(torch.cat(order)[offset:offset + self.samples].tolist())


class DetectionData(pl.LightningDataModule):
    """Train on the train split; validate on the first ``val_size`` val images, test on the first ``test_size``
    (None: all)."""

    def __init__(self, name: str = "fashion_scenes", steps: int = 400, epochs: int = 1, batch_size: int = 4,
                 eval_batch_size: int = 8, num_workers: int = 0, val_size: int | None = None,
                 test_size: int | None = None, hflip: bool = True,
                 train_images: str | None = None, train_ann: str | None = None, val_images: str | None = None,
                 val_ann: str | None = None, generate: dict | None = None, fashion_root: str | None = None,
                 cache_dir: str | None = None, seed: int = 0):
        super().__init__()
        require_positive("task.data", batch_size=batch_size, eval_batch_size=eval_batch_size, val_size=val_size,
                         test_size=test_size)
        require_positive("task", steps=steps, epochs=epochs)
        if steps % epochs:  # every epoch trains as many steps: the run would train more than task.steps
            raise ValueError(f"task.steps={steps} is not a multiple of task.epochs={epochs} (the validation "
                             f"periods, each as many steps); give e.g. task.steps={steps // epochs * epochs or epochs}")
        self.name, self.steps, self.epochs = name, steps, epochs
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_size, self.seed = val_size, seed
        self.splits = self.locate(name, train_images, train_ann, val_images, val_ann, generate or {}, fashion_root,
                                  cache_dir)
        self.train_coco = read_coco(self.splits["train"])
        self.val_coco = read_coco(self.splits["val"])
        categories = sorted(self.train_coco.coco.cats)
        if sorted(self.val_coco.coco.cats) != categories:
            raise DatasetError(f"train and val annotation files list different categories "
                               f"({self.splits['train'].annotations}, {self.splits['val'].annotations})")
        self.category_ids = categories  # label i (1..K) is category_ids[i - 1]
        self.class_names = [self.train_coco.coco.cats[c]["name"] for c in categories]
        train_dropped = drop_unusable_annotations(self.train_coco, self.splits["train"].annotations, keep_crowd=False)
        val_dropped = drop_unusable_annotations(self.val_coco, self.splits["val"].annotations, keep_crowd=True)
        fill_eval_fields(self.val_coco, self.splits["val"].annotations)
        self.require_ground_truth(train_dropped, val_dropped, val_size, test_size)
        evaluated = self.val_coco.ids[:max(val_size, test_size)] if val_size and test_size else self.val_coco.ids
        if faults := annotated_size_faults(self.val_coco, evaluated):  # train images are checked as they are read
            raise DatasetError(f"{len(faults)} of the {len(evaluated)} evaluated val images differ from "
                               f"{self.splits['val'].annotations}: {first_of(faults)}; fix their height and width "
                               "there (or replace the files)")
        label_of = {c: i + 1 for i, c in enumerate(categories)}
        train_tf = [v2.RandomHorizontalFlip()] if hflip else []
        as_float = [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1)]
        self.train_set = DetectionDataset(self.train_coco, v2.Compose(train_tf + as_float), label_of)
        # evaluation reads the images only (COCOeval takes the ground truth from the annotation file)
        eval_set = DetectionDataset(self.val_coco, v2.Compose(as_float[:1]), label_of, ("image_id",))
        first = lambda n: Subset(eval_set, range(min(n, len(eval_set)))) if n else eval_set  # noqa: E731
        self.val_set, self.test_set = first(val_size), first(test_size)
        log.info("%s: %d train images (%d annotations), %d val images (%d annotations; %d for in-training "
                 "validation, %d for the test stage), %d categories", name, len(self.train_set),
                 len(self.train_coco.coco.anns), len(eval_set), len(self.val_coco.coco.anns), len(self.val_set),
                 len(self.test_set), len(categories))

    def require_ground_truth(self, train_dropped: dict[str, int], val_dropped: dict[str, int],
                             val_size: int | None, test_size: int | None) -> None:
        """Without annotations to learn from, training ends `completed` with AP 0; without any to evaluate
        against, COCOeval's AP is undefined (-1, reported as 0): both are data errors, not results."""
        train, val = self.splits["train"].annotations, self.splits["val"].annotations
        if not ground_truth_count(self.train_coco.coco, self.train_coco.ids):
            why = (f"all {sum(train_dropped.values())} were dropped: {describe_dropped(train_dropped)}"
                   if any(train_dropped.values()) else "it lists none")
            raise DatasetError(f"training annotation file {train} has no usable annotation ({why}); a run would "
                               "learn nothing. Fix the annotations or give another file")
        if not ground_truth_count(self.val_coco.coco, self.val_coco.ids):
            why = f"{describe_dropped(val_dropped)} dropped" if any(val_dropped.values()) else "it lists none"
            raise DatasetError(f"val annotation file {val} has no annotation that COCO AP can be measured against "
                               f"({why}, crowd regions only mark areas to ignore); give a val set with annotations")
        for key, size in (("val_size", val_size), ("test_size", test_size)):
            if not ground_truth_count(self.val_coco.coco, self.val_coco.ids[:size]):
                raise DatasetError(f"the first {size} val images of {val} (task.data.{key}={size}) hold no "
                                   f"annotation that COCO AP can be measured against; raise task.data.{key} or set "
                                   f"it to null (all {len(self.val_coco.ids)} images)")

    @staticmethod
    def locate(name, train_images, train_ann, val_images, val_ann, generate, fashion_root, cache_dir):
        if name == "fashion_scenes":
            root = ensure_fashion_scenes(cache_dir, fashion_root, **generate)
            return {s: Split(root / s, root / "annotations" / f"instances_{s}.json", s) for s in ("train", "val")}
        if name == "coco":
            given = {"train_images": train_images, "train_ann": train_ann, "val_images": val_images,
                     "val_ann": val_ann}
            unset = [k for k, v in given.items() if not v]
            if unset:
                raise DatasetError(f"task.data.name=coco needs {', '.join('task.data.' + k for k in unset)} (image "
                                   "folders and COCO instances JSON files)")
            return {"train": Split(Path(train_images).expanduser(), Path(train_ann).expanduser(), "train"),
                    "val": Split(Path(val_images).expanduser(), Path(val_ann).expanduser(), "val")}
        raise DatasetError(f"unknown detection dataset {name!r}; choose fashion_scenes (generated) or coco "
                           "(any COCO-format set by path)")

    @property
    def steps_per_epoch(self) -> int:
        return self.steps // self.epochs

    def train_dataloader(self):
        draws = draws_for_all_ranks(self, self.steps_per_epoch * self.batch_size)  # each rank: steps_per_epoch batches
        sampler = StepSampler(len(self.train_set), draws, self.seed)
        return DataLoader(self.train_set, self.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=True)

    def eval_loader(self, dataset):
        return DataLoader(dataset, self.eval_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return self.eval_loader(self.val_set)

    def test_dataloader(self):
        return self.eval_loader(self.test_set)

