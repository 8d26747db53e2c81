"""COCO box and mask AP with pycocotools' ``COCOeval``, against the val set's own annotation file."""
from __future__ import annotations

import contextlib
import copy
import io
import logging

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)
IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5


def to_coco_results(output: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's predictions (boxes XYXY, labels 1..K, scores, mask probabilities N x 1 x H x W) in COCO's
    results format, one entry per detection with its box and RLE mask."""
    boxes = output["boxes"].detach().float().cpu()
    if not len(boxes):
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    masks = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    results = []
    for box, label, score, rle in zip(xywh, output["labels"].tolist(), output["scores"].tolist(), rles):
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": category_ids[label - 1], "bbox": box,
                        "score": score, "segmentation": rle})
    return results


def coco_ap(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> dict[str, float]:
    """``{"bbox_AP": ..., "segm_AP50": ...}`` over ``image_ids``; an empty prediction set scores 0."""
    metrics = {f"{iou}_{name}": 0.0 for iou in IOU_TYPES for name in STAT_NAMES}
    if not results or not image_ids:
        log.info("COCO eval: no detections on %d images; every AP is 0", len(image_ids))
        return metrics
    for iou_type in IOU_TYPES:
        # loadRes takes an entry's area from its box where it has one, and the area sorts detections into APs /
        # APm / APl: the mask evaluation gets its entries without boxes, so that it sorts them by mask area
        entries = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
            coco_dt = coco_gt.loadRes(copy.deepcopy(entries))  # loadRes edits the entries it is given
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # COCOeval reports -1 where a size range has no ground truth; count it as 0 rather than a negative AP
        for name, value in zip(STAT_NAMES, evaluator.stats[:6]):
            metrics[f"{iou_type}_{name}"] = max(0.0, float(value))
    return metrics
