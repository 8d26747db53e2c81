"""Mask R-CNN task: every layer at every norm position, COCO data by path and generated, COCO AP, backbone
transfer from a classification checkpoint, and results.json through the run pipeline. Tiny images and widths."""
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import write_png

import evonorm
from tasks.common.backbones import preact_resnet
from tasks.common.datasets import DatasetError, load_fashion_mnist
from tasks.common.images import CAPTION_HEIGHT
from tasks.maskrcnn.data import DetectionData, read_coco, Split
from tasks.maskrcnn.evaluation import coco_ap
from tasks.maskrcnn.model import BackboneCheckpointError, build_maskrcnn
from tasks.maskrcnn.module import MaskRCNNModule, panel_content
from tasks.maskrcnn.scenes import ensure_fashion_scenes

from conftest import CONF_DIR

TINY_MODEL = dict(fpn_channels=16, head_channels=16, box_fc_dim=32, anchor_sizes=(8, 16, 32, 64, 128),
                  train_sizes=(64,), test_size=64, max_size=64, rpn_pre_nms_top_n_train=100,
                  rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                  rpn_batch_size_per_image=32, box_batch_size_per_image=16, box_detections_per_img=10)
TINY_OVERRIDES = ["task=maskrcnn", "logger=none", "trainer.enable_progress_bar=false",
                  "trainer.num_sanity_val_steps=0", "task.steps=2", "task.data.batch_size=2",
                  "task.data.eval_batch_size=4", "task.optim.num_drawn=2",
                  *(f"task.model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY_MODEL.items())]


def tiny_batch(n=2, size=64, objects=True):
    images = [torch.rand(3, size, size) for _ in range(n)]
    targets = []
    for _ in range(n):
        masks = torch.zeros(1 if objects else 0, size, size, dtype=torch.uint8)
        if objects:
            masks[0, 10:40, 12:44] = 1
        boxes = torch.tensor([[12.0, 10.0, 44.0, 40.0]]) if objects else torch.zeros(0, 4)
        targets.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "masks": masks})
    return images, targets


@pytest.mark.parametrize("norm", evonorm.NORM_ACT_NAMES)
def test_every_layer_trains_and_evaluates(norm):
    model = build_maskrcnn(evonorm.norm_act_factory(norm), num_classes=3, **TINY_MODEL)
    norms = [m for m in model.modules() if isinstance(m, evonorm.factory.NORM_LAYER_TYPES)]
    chosen = type(evonorm.norm_act(norm, 8))
    # every norm position holds the chosen layer: 2 x 8 blocks + final + 3 level norms, 8 FPN convs, 8 head convs
    assert len(norms) == 16 + 1 + 3 + 8 + 8 and all(isinstance(m, chosen) for m in norms)
    assert all(not m.apply_act for m in model.backbone.fpn.modules() if isinstance(m, chosen))
    model.train()
    losses = model(*tiny_batch())
    sum(losses.values()).backward()
    assert set(losses) >= {"loss_classifier", "loss_mask", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch()[0])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}


def test_norm_in_gives_standard_choice_elsewhere(caplog):
    with caplog.at_level(logging.INFO):
        model = build_maskrcnn(evonorm.norm_act_factory("s0"), 3, norm_in=["heads"], **TINY_MODEL)
    assert model.norm_placement == {"backbone": "gn_relu", "fpn": "none", "heads": "s0"}
    assert "backbone=gn_relu, fpn=none, heads=s0" in caplog.text
    assert isinstance(model.backbone.body.final_norm, evonorm.baselines.GroupNormAct)
    assert not any(isinstance(m, evonorm.factory.NORM_LAYER_TYPES) for m in model.backbone.fpn.modules())
    with pytest.raises(ValueError, match="unknown positions"):
        build_maskrcnn(evonorm.norm_act_factory("s0"), 3, norm_in=["neck"], **TINY_MODEL)


def test_roi_sampling_ratio_reaches_both_poolers(tmp_path):
    model = build_maskrcnn(evonorm.norm_act_factory("gn_relu"), 3, roi_sampling_ratio=1, **TINY_MODEL)
    assert [model.roi_heads.box_roi_pool.sampling_ratio, model.roi_heads.mask_roi_pool.sampling_ratio] == [1, 1]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # CPU default 1; the COCO recipe keeps 2
        cpu = compose("config", overrides=["task=maskrcnn", f"output_dir={tmp_path}"])
        coco = compose("config", overrides=["experiment=maskrcnn_r50_fpn_coco", f"output_dir={tmp_path}"])
    assert (cpu.task.model.roi_sampling_ratio, coco.task.model.roi_sampling_ratio) == (1, 2)


def test_training_draws_sizes_from_train_sizes_only_and_evaluation_uses_test_size():
    model = build_maskrcnn(evonorm.norm_act_factory("b0"), 3, **{**TINY_MODEL, "train_sizes": (40, 48),
                                                                  "test_size": 64, "max_size": 200})
    image = [torch.rand(3, 64, 64)]
    model.train()
    torch.manual_seed(0)
    drawn = {tuple(model.transform(image)[0].image_sizes[0]) for _ in range(40)}
    assert drawn == {(40, 40), (48, 48)}  # never the test size
    model.eval()
    assert model.transform(image)[0].image_sizes == [(64, 64)]
    model.train()
    assert model.transform.min_size == (40, 48)


def mask_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_mask_ap_sorts_detections_into_sizes_by_mask_area_not_box_area():
    truth = np.zeros((200, 200))
    truth[10:30, 10:30] = 1  # a small object (400 px)
    thin = np.zeros((200, 200))
    thin[100:200, 100:102] = thin[100:102, 100:200] = 1  # a false positive: small mask (~400 px), large box
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": 200, "width": 200}], "categories": [{"id": 5, "name": "a"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20],
                                     "area": 400.0, "iscrowd": 0, "segmentation": mask_rle(truth)}]}
    coco.createIndex()
    results = [{"image_id": 1, "category_id": 5, "bbox": [100, 100, 100, 100], "score": 0.9,
                "segmentation": mask_rle(thin)},
               {"image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "score": 0.8,
                "segmentation": mask_rle(truth)}]
    metrics = coco_ap(coco, results, [1])
    assert metrics["segm_AP"] == pytest.approx(0.5, abs=0.01)
    assert metrics["segm_APs"] == pytest.approx(0.5, abs=0.01)  # by box area the false positive would not count
    assert metrics["bbox_APs"] == pytest.approx(1.0)  # for boxes it is a large detection: not among the small


def test_zero_roi_batches_keep_running_var_finite_and_empty_predictions_score_zero():
    model = build_maskrcnn(evonorm.norm_act_factory("b0"), 3, **TINY_MODEL).train()
    losses = model(*tiny_batch(objects=False))  # negatives only: no positive RoI reaches the mask head
    sum(losses.values()).backward()
    assert losses["loss_mask"].item() == 0 and torch.isfinite(sum(losses.values()))
    running = [m.running_var for m in model.modules() if isinstance(m, evonorm.EvoNormB0)]
    assert running and all(torch.isfinite(v).all() for v in running)
    model.eval().roi_heads.score_thresh = 1.1  # nothing passes: the mask head sees zero RoIs
    with torch.no_grad():
        out = model(tiny_batch()[0])
    assert all(len(o["boxes"]) == 0 for o in out)
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": 64, "width": 64}], "categories": [{"id": 1, "name": "a"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "area": 81,
                                     "iscrowd": 0, "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]]}]}
    coco.createIndex()
    assert set(coco_ap(coco, [], [1]).values()) == {0.0}


def test_freeze_norm_stats_keeps_running_statistics():
    model = build_maskrcnn(evonorm.norm_act_factory("bn_relu"), 3, freeze_norm_stats=True, **TINY_MODEL)
    module = MaskRCNNModule(model, [1, 2], ["a", "b"]).train()
    before = model.backbone.body.final_norm.running_var.clone()
    model(*tiny_batch())
    assert torch.equal(model.backbone.body.final_norm.running_var, before)
    assert module.training and not model.backbone.body.final_norm.training


def test_generated_scenes_are_valid_coco_and_deterministic(tmp_path):
    params = dict(seed=3, image_size=64, num_train=6, num_val=12, max_items=3)
    first = ensure_fashion_scenes(str(tmp_path / "a"), **params)
    second = ensure_fashion_scenes(str(tmp_path / "b"), **params)
    assert first.name == second.name and "s3-64px-6-12" in first.name
    for split in ("train", "val"):
        ann = f"annotations/instances_{split}.json"
        assert (first / ann).read_text() == (second / ann).read_text()
        assert (first / split / "000001.png").read_bytes() == (second / split / "000001.png").read_bytes()
    other = ensure_fashion_scenes(str(tmp_path / "a"), **{**params, "seed": 4})
    assert other != first  # the seed is part of the cache key
    coco = COCO(str(first / "annotations/instances_val.json"))
    assert len(coco.getImgIds()) == 12 and len(coco.getCatIds()) == 10 and coco.getAnnIds()
    for ann in coco.loadAnns(coco.getAnnIds()):  # box from the mask, area of the mask
        assert np.allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])
        assert mask_utils.area(ann["segmentation"]) == ann["area"] > 0
    as_predictions = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                       "segmentation": a["segmentation"], "score": 1.0} for a in coco.loadAnns(coco.getAnnIds())]
    metrics = coco_ap(coco, as_predictions, coco.getImgIds())
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)
    data = DetectionData(steps=2, batch_size=2, cache_dir=str(tmp_path / "a"), generate=params)
    image, target = data.train_set[0]
    assert image.dtype == torch.float32 and target["masks"].shape[1:] == image.shape[1:]
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])


def write_foreign_coco(root, bad_annotation=False):
    """A COCO-format set of real scikit-image photos with hand-made masks: polygons, RLE, a negative image,
    a degenerate annotation."""
    import skimage.data
    import torch.nn.functional as F

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, photo in enumerate(photos, start=1):
        x = torch.from_numpy(photo).permute(2, 0, 1).float()[None]
        write_png(F.interpolate(x, size=(64, 80), mode="bilinear")[0].to(torch.uint8), str(root / "images" /
                                                                                             f"p{i}.png"))
        images.append({"id": i, "file_name": f"p{i}.png", "height": 64, "width": 80})
        if i == 4:
            continue  # a negative
        polygon = [[10, 10, 40, 12, 38, 44, 12, 40]]
        mask = np.zeros((64, 80), np.uint8, order="F")
        mask[20:50, 45:70] = 1
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode()
        anns += [{"id": len(anns) + 1, "image_id": i, "category_id": 7, "bbox": [10, 10, 30, 34], "area": 900,
                  "iscrowd": 0, "segmentation": polygon},
                 {"id": len(anns) + 2, "image_id": i, "category_id": 3, "bbox": [45, 20, 25, 30], "area": 750,
                  "iscrowd": 0, "segmentation": rle}]
    anns.append({"id": 99, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0,
                 "segmentation": [[5, 5, 5, 9]]})  # degenerate: dropped with a logged count
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 3, "name": "round"}, {"id": 7, "name": "square"}]}
    path = root / "instances.json"
    path.write_text(json.dumps(coco)[:-5] if bad_annotation else json.dumps(coco))
    return path


def test_foreign_coco_set_trains_and_evaluates_through_the_pipeline(tmp_path, caplog):
    from pipelines.run import run

    ann = write_foreign_coco(tmp_path / "coco")
    out = tmp_path / "run"
    paths = [f"task.data.{split}_{kind}={path}" for split in ("train", "val")
             for kind, path in (("images", tmp_path / "coco" / "images"), ("ann", ann))]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY_OVERRIDES, "task.data.name=coco", *paths, "norm=s0",
                                           f"output_dir={out}"])
    with caplog.at_level(logging.WARNING):
        record = run(cfg)
    assert "dropped 0 crowd regions (iscrowd=1) and 1 degenerate annotations" in caplog.text
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "completed" and saved["task"] == "maskrcnn" and saved["dataset"] == "coco"
    assert saved["monitor"] == "val/segm_AP" and "val/segm_AP" in saved["best_val"]
    for iou in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert 0.0 <= saved["test"][f"test/{iou}_{name}"] <= 1.0
    assert saved["steps"] == 2 and saved["coco_eval"]["test"]["images"] == 4
    assert saved["norm_placement"] == {"backbone": "s0", "fpn": "s0", "heads": "s0"}
    assert record["test"] == saved["test"]
    assert list((out / "images").glob("test-predictions-*.png"))


def test_broken_json_and_missing_image_name_the_file(tmp_path):
    ann = write_foreign_coco(tmp_path / "broken", bad_annotation=True)
    with pytest.raises(DatasetError, match=f"{ann}.*not valid JSON"):
        read_coco(Split(tmp_path / "broken" / "images", ann, "train"))
    ann = write_foreign_coco(tmp_path / "ok")
    (tmp_path / "ok" / "images" / "p2.png").unlink()
    with pytest.raises(DatasetError, match="p2.png"):
        read_coco(Split(tmp_path / "ok" / "images", ann, "train"))
    with pytest.raises(DatasetError, match="nothing.json not found; give task.data.train_ann="):
        read_coco(Split(tmp_path / "ok" / "images", tmp_path / "nothing.json", "train"))


@pytest.fixture(scope="module")
def foreign_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    return root / "images", json.loads(write_foreign_coco(root).read_text())


def all_annotations(change):
    return lambda coco: [change(a) for a in coco["annotations"]]


# (how the file breaks, the split it is given as, what the error says, DetectionData settings)
BROKEN_ANNOTATION_FILES = {
    "unknown category_id": (lambda c: c["annotations"][2].update(category_id=777), "train",
                            r"annotation ids 3 with category_id 777\): add those categories", {}),
    "image_id without image": (lambda c: c["annotations"][1].update(image_id=424242), "val",
                               r"annotation ids 2 with image_id 424242\): add those images", {}),
    "no images key": (lambda c: c.pop("images"), "train", "lists no images", {}),
    "image without height": (lambda c: c["images"][1].pop("height"), "train", r"1 images .*: id 2 \(height\)", {}),
    "image without width": (lambda c: c["images"][0].pop("width"), "val", r"id 1 \(width\)", {}),
    "no images": (lambda c: c.update(images=[]), "train", "lists no images", {}),
    "no categories key": (lambda c: c.pop("categories"), "train", "lists no categories", {}),
    "categories {}": (lambda c: c.update(categories={}), "val", "lists no categories", {}),
    "no annotations key": (lambda c: c.pop("annotations"), "train", r"no usable annotation \(it lists none\)", {}),
    "all degenerate": (all_annotations(lambda a: a.update(bbox=[0, 0, 0, 0])), "train",
                       r"all 7 were dropped: 0 crowd regions \(iscrowd=1\) and 7 degenerate", {}),
    "all crowd": (all_annotations(lambda a: a.update(iscrowd=1)), "train", r"dropped: 7 crowd regions", {}),
    "val without annotations": (lambda c: c.update(annotations=[]), "val", "no annotation that COCO AP", {}),
    "val crowd only": (all_annotations(lambda a: a.update(iscrowd=1)), "val", "crowd regions only mark", {}),
    "repeated image id": (lambda c: c["images"][3].update(id=1), "train",
                          r"1 images ids are used more than once \(1\): give every entry its own id", {}),
    "repeated annotation id": (lambda c: c["annotations"][1].update(id=1), "val",
                               r"1 annotations ids are used more than once \(1\)", {}),
    "val image of another size": (lambda c: c["images"][2].update(height=80, width=64), "val",
                                  r"1 of the 4 evaluated val images differ from .*: p3.png is 64x80, annotated 80x64",
                                  {}),
    "string image id": (lambda c: c["images"][0].update(id="p1"), "train",
                        r"1 images with a missing or bad field: entry #0 \(id\)", {}),
    "val_size images unannotated": (lambda c: c.update(annotations=[a for a in c["annotations"] if a["image_id"] > 2]),
                                    "val", r"first 2 val images .*task.data.val_size=2", {"val_size": 2}),
}


@pytest.mark.parametrize("case", BROKEN_ANNOTATION_FILES)
def test_broken_annotation_file_is_refused_up_front_naming_file_and_entries(foreign_coco, tmp_path, case):
    images, content = foreign_coco
    break_it, split, says, settings = BROKEN_ANNOTATION_FILES[case]
    good, broken = tmp_path / "good.json", tmp_path / "broken.json"
    good.write_text(json.dumps(content))
    content = json.loads(json.dumps(content))
    break_it(content)
    broken.write_text(json.dumps(content))
    anns = {"train_ann": broken if split == "train" else good, "val_ann": broken if split == "val" else good}
    with pytest.raises(DatasetError, match=says) as error:
        DetectionData(name="coco", steps=2, batch_size=2, train_images=str(images), val_images=str(images),
                      **{k: str(v) for k, v in anns.items()}, **settings)
    assert str(broken) in str(error.value)


def test_annotations_without_area_or_iscrowd_are_completed_for_cocoeval(foreign_coco, tmp_path, caplog):
    images, content = foreign_coco
    full = {a["id"]: a for a in content["annotations"]}
    bare = json.loads(json.dumps(content))
    for a in bare["annotations"]:
        del a["area"], a["iscrowd"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    with caplog.at_level(logging.WARNING):
        data = DetectionData(name="coco", steps=2, batch_size=2, train_images=str(images), val_images=str(images),
                             train_ann=str(tmp_path / "bare.json"), val_ann=str(tmp_path / "bare.json"))
    assert "6 annotations without iscrowd taken as 0 (not crowd), 6 without area given their mask's area" in \
        caplog.text
    kept = [a for anns in data.val_coco.coco.imgToAnns.values() for a in anns]
    assert len(kept) == 6 and all(a["iscrowd"] == 0 for a in kept)
    assert [a["area"] for a in kept if isinstance(a["segmentation"], dict)] == [750.0] * 3  # the 25 x 30 RLE masks
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": full[a["id"]]["bbox"],
                "score": 1.0, "segmentation": data.val_coco.coco.annToRLE(a)} for a in kept]
    metrics = coco_ap(data.val_coco.coco, results, data.val_coco.ids)  # COCOeval reads both fields
    assert metrics["segm_AP"] == pytest.approx(1.0) and metrics["bbox_AP"] == pytest.approx(1.0)


def test_undecodable_image_is_named_at_its_step(foreign_coco, tmp_path):
    images, content = foreign_coco
    shutil.copytree(images, tmp_path / "images")
    png = tmp_path / "images" / "p2.png"
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    (tmp_path / "ann.json").write_text(json.dumps(content))
    paths = {f"{split}_{kind}": str(tmp_path / name) for split in ("train", "val")
             for kind, name in (("images", "images"), ("ann", "ann.json"))}
    data = DetectionData(name="coco", steps=2, batch_size=2, **paths)
    data.train_set[0]  # the others decode
    with pytest.raises(DatasetError, match=rf"image {png} \(image id 2\) cannot be decoded .*truncated.*replace"):
        data.train_set[1]


def test_train_image_of_another_size_is_named_at_its_step(foreign_coco, tmp_path):
    images, content = foreign_coco
    (tmp_path / "val.json").write_text(json.dumps(content))
    content = json.loads(json.dumps(content))
    content["images"][1].update(height=32, width=40)
    (tmp_path / "train.json").write_text(json.dumps(content))
    data = DetectionData(name="coco", steps=2, batch_size=2, train_images=str(images), val_images=str(images),
                         train_ann=str(tmp_path / "train.json"), val_ann=str(tmp_path / "val.json"))
    data.train_set[0]
    with pytest.raises(DatasetError, match=rf"image {images / 'p2.png'} \(image id 2\) is 64x80 but annotated "
                                           "32x40; fix its height and width"):
        data.train_set[1]


def test_fashion_scenes_errors_name_this_tasks_keys(tmp_path):
    with pytest.raises(DatasetError, match="task.data.fashion_root=<folder>") as missing:
        ensure_fashion_scenes(str(tmp_path / "cache"), fashion_root=str(tmp_path / "nope"), num_train=1, num_val=1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        data_keys = compose("config", overrides=["task=maskrcnn", f"output_dir={tmp_path}"]).task.data
    assert not (tmp_path / "cache").exists()  # nothing half-made
    named = set(re.findall(r"task\.data\.(\w+)", str(missing.value)))
    assert named == {"fashion_root"} and set(data_keys) >= named  # no download key in this task
    with pytest.raises(DatasetError, match="task.data.root=<folder> task.data.download=true"):  # the default
        load_fashion_mnist(str(tmp_path / "nope"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DatasetError, match=rf"under {tmp_path / 'a_file'} .*task.data.cache_dir=<folder> \(or "
                                           "EVONORM_DATA_CACHE\\) at a writable folder"):
        ensure_fashion_scenes(str(tmp_path / "a_file"), num_train=1, num_val=1)


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size", "val_size", "test_size"])
def test_nonpositive_sizes_are_refused_before_any_data_is_read(key):
    with pytest.raises(ValueError, match=rf"task.data.{key}=0: must be positive"):
        DetectionData(name="coco", **{key: 0})  # no paths given: reading anything would fail differently


def test_steps_that_epochs_do_not_divide_are_refused():
    with pytest.raises(ValueError, match=r"task.steps=1001 is not a multiple of task.epochs=2 .*task.steps=1000"):
        DetectionData(name="coco", steps=1001, epochs=2)


def classification_checkpoint(tmp_path, arch, norm):
    """What a task=classification run leaves: <run>/checkpoints/last.ckpt and <run>/results.json."""
    from tasks.classification.module import ClassificationModule

    run_dir = tmp_path / f"cls-{arch}-{norm}"
    (run_dir / "checkpoints").mkdir(parents=True)
    module = ClassificationModule(preact_resnet(arch, evonorm.norm_act_factory(norm), 10), 10)
    torch.save({"state_dict": module.state_dict()}, run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "results.json").write_text(json.dumps({"task": "classification", "model": arch,
                                                      "norm": {"name": norm}}))
    return run_dir / "checkpoints" / "last.ckpt", module


def test_backbone_from_classification_checkpoint(tmp_path):
    ckpt, module = classification_checkpoint(tmp_path, "preact_resnet18", "b0")
    model = build_maskrcnn(evonorm.norm_act_factory("b0"), 3, backbone_ckpt=str(ckpt), **TINY_MODEL)
    assert torch.equal(model.backbone.body.stem[0].weight, module.model.stem[0].weight)
    assert torch.equal(model.backbone.body.final_norm.v, module.model.final_norm.v)
    with pytest.raises(BackboneCheckpointError, match=r"layer s0.*layer b0"):
        build_maskrcnn(evonorm.norm_act_factory("b0"), 3, backbone_ckpt=str(
            classification_checkpoint(tmp_path, "preact_resnet18", "s0")[0]), **TINY_MODEL)
    with pytest.raises(BackboneCheckpointError, match=r"model preact_resnet_cifar.*preact_resnet18"):
        build_maskrcnn(evonorm.norm_act_factory("b0"), 3, backbone_ckpt=str(
            classification_checkpoint(tmp_path, "preact_resnet_cifar", "b0")[0]), **TINY_MODEL)


def test_drawn_panels_show_confident_predictions_else_the_best_in_grey():
    module = MaskRCNNModule(torch.nn.Identity(), category_ids=[1, 2], class_names=["bag", "coat"], draw_score=0.3)
    image = torch.zeros(3, 64, 64)
    mask = torch.zeros(1, 64, 64)
    mask[0, 8:24, 8:24] = 1

    def detections(scores):
        n = len(scores)
        return {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]).repeat(n, 1), "labels": torch.ones(n, dtype=torch.int64),
                "scores": torch.tensor(scores), "masks": mask.repeat(n, 1, 1, 1)}

    module.drawn = [panel_content(image, detections(scores), 0.3)
                    for scores in ([0.9, 0.1], [0.2, 0.1, 0.05, 0.01], [])]
    assert [len(shown["boxes"]) for _, shown, _, _ in module.drawn] == [1, 3, 0]  # only what is drawn is kept
    assert all(shown["masks"].dtype == torch.bool for _, shown, _, _ in module.drawn)
    grid = module.draw_predictions()
    panel = 256 + CAPTION_HEIGHT  # 64 px images upscaled to 256
    assert grid.shape == (3, panel + 8, 3 * (256 + 4) + 4)
    panels = [grid[:, 4:4 + panel, 4 + i * 260:4 + i * 260 + 256] for i in range(3)]
    grey, bag_colour = (torch.tensor(rgb, dtype=torch.uint8)[:, None] for rgb in ([128, 128, 128], [31, 119, 180]))
    box_edge = [p[:, 32:96, 32].reshape(3, -1) for p in panels]  # the left side of the upscaled box
    assert (box_edge[0] == bag_colour).all(0).any() and not (box_edge[0] == grey).all(0).any()
    assert (box_edge[1] == grey).all(0).any()  # below the threshold: the best drawn in grey
    assert not panels[2][:, :256].any()  # nothing detected: the image alone
    captions = [p[:, 256:] for p in panels]
    assert all((c < 255).any() for c in captions) and not torch.equal(captions[0], captions[1])
