"""Classification models and data: the factory is used at every norm position; data errors are clear."""
import gzip
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import evonorm
from tasks.classification.data import ClassificationData, random_crop_flip
from tasks.common.datasets import DatasetError, read_idx
from tasks.classification.models import build_model

ARCHS = ["preact_resnet18", "preact_resnet50", "preact_resnet_cifar", "mobilenet_v2", "efficientnet"]


class CountingFactory:
    """A norm-act factory that records what each model asks for."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def __call__(self, num_features, apply_act=True):
        self.calls.append(apply_act)
        return evonorm.norm_act(self.name, num_features, apply_act=apply_act)


def norm_modules(model):
    return [m for m in model.modules() if isinstance(m, evonorm.factory.NORM_LAYER_TYPES)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_norm_comes_from_the_factory(arch):
    factory = CountingFactory("s0")
    model = build_model(arch, factory, num_classes=7, in_chans=3)
    assert len(norm_modules(model)) == len(factory.calls) > 0
    assert all(isinstance(m, evonorm.EvoNormS0) for m in norm_modules(model))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["preact_resnet50", "mobilenet_v2", "efficientnet"])
def test_baseline_has_identical_architecture(arch):
    def conv_shapes(norm):
        model = build_model(arch, evonorm.norm_act_factory(norm), 10)
        return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    assert conv_shapes("bn_relu") == conv_shapes("b0")


def test_preact_resnet50_follows_reference_placement():
    factory = CountingFactory("b0")
    model = build_model("preact_resnet50", factory, 1000)
    # 16 bottlenecks x 3 norm-acts + the final one; no norm after the stem conv, none at a branch end
    assert len(factory.calls) == 16 * 3 + 1 and all(factory.calls)
    assert isinstance(model.stem[0], nn.Conv2d) and isinstance(model.stem[1], nn.MaxPool2d)
    block = model.stages[0][0]
    assert isinstance(block.conv3, nn.Conv2d) and block.shortcut is not None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(25.6e6, rel=0.01)


def test_mobilenet_v2_linear_bottlenecks_use_apply_act_false(caplog):
    factory = CountingFactory("b0")
    with caplog.at_level(logging.INFO):
        build_model("mobilenet_v2", factory, 1000)
    assert factory.calls.count(False) == 17  # one per inverted residual block
    assert "linear-bottleneck" in caplog.text and "apply_act=False" in caplog.text


@pytest.mark.parametrize("width_mult", [0.35, 0.75, 1.0])
def test_mobilenet_v2_widths_are_the_references(width_mult):
    from torchvision.models import mobilenet_v2
    ours = build_model("mobilenet_v2", evonorm.norm_act_factory("bn_relu"), 1000, width_mult=width_mult)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in mobilenet_v2(
        width_mult=width_mult).parameters())


def test_efficientnet_is_b0s_layout_with_squeeze_excite_and_depthwise_convs():
    import timm
    ours = build_model("efficientnet", evonorm.norm_act_factory("bn_relu"), 1000)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in timm.create_model(
        "efficientnet_b0").parameters())
    blocks = [m for m in ours.modules() if type(m).__name__ == "MBConv"]
    assert len(blocks) == 16 and all(any(type(m).__name__ == "SqueezeExcite" for m in b.modules()) for b in blocks)
    depthwise = [m for m in ours.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert sorted({m.kernel_size[0] for m in depthwise}) == [3, 5] and len(depthwise) == 16
    factory = CountingFactory("s0")
    build_model("efficientnet", factory, 10)
    assert factory.calls.count(False) == 16  # one linear bottleneck (no activation) per block


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet"])
def test_small_mobile_nets_keep_maps_larger_than_1x1(arch):
    """depth_mult and output_stride make the narrow, shallow anchors of the layer search for 14 px images."""
    full = build_model(arch, evonorm.norm_act_factory("bn_relu"), 10, 1)
    small = build_model(arch, evonorm.norm_act_factory("bn_relu"), 10, 1, width_mult=0.25, depth_mult=0.2,
                        output_stride=4)
    x = torch.randn(2, 1, 14, 14)
    assert full.features(x).shape[-1] == 1 and small.features(x).shape[-1] == 4
    blocks = lambda m: sum(type(b).__name__ in ("InvertedResidual", "MBConv") for b in m.modules())  # noqa: E731
    assert blocks(full) in (16, 17) and blocks(small) == 7
    assert small(x).shape == (2, 10)


def test_unknown_arch():
    with pytest.raises(ValueError, match="preact_resnet50"):
        build_model("resnet1000", evonorm.norm_act_factory("b0"), 10)


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image_flipped_left_right_at_random():
    x = torch.arange(1, 64 * 3 * 5 * 7 + 1, dtype=torch.float32).view(64, 3, 5, 7)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2,) * 4)
    shifts, flips = set(), set()
    for img, src in zip(out, padded):
        windows = {(dy, dx, flip): src[:, dy:dy + 5, dx:dx + 7].flip(2) if flip else src[:, dy:dy + 5, dx:dx + 7]
                   for dy in range(5) for dx in range(5) for flip in (False, True)}
        found = [key for key, window in windows.items() if torch.equal(img, window)]
        assert found, "not a window of the padded image, flipped left-right or not"
        shifts.add(found[0][:2])
        flips.add(found[0][2])
    assert flips == {False, True} and len(shifts) > 10  # both ways, and many offsets over 64 images


def test_fashion_mnist_splits():
    data = ClassificationData(val_size=5000)
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    x, y = data.splits["train"].__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, r"task.data.batch_size=0: must be positive"),
    ({"limit_train": 0, "limit_eval": -1}, r"task.data.limit_train=0, task.data.limit_eval=-1: must be positive"),
    ({"val_size": 0}, r"task.data.val_size=0: must be positive"),
])
def test_bad_sizes_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        ClassificationData(**settings)


@pytest.mark.parametrize("settings, processes", [({"val_size": 100_000}, 1), ({"limit_train": 100}, 1),
                                                 ({"limit_train": 200}, 2)])
def test_a_training_split_without_one_batch_is_refused(settings, processes):
    data = ClassificationData(batch_size=128, **settings)
    data.trainer = SimpleNamespace(world_size=processes)  # DDP: each process needs a whole batch
    with pytest.raises(DatasetError, match=rf"fewer than one batch \(task.data.batch_size=128\) for each of "
                                           rf"{processes} process\(es\); lower task.data.batch_size"):
        data.setup()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    data = ClassificationData(root=str(tmp_path))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.setup()


def test_broken_idx_file(tmp_path):
    good = tmp_path / "good-idx1-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    assert read_idx(good).tolist() == [7, 8, 9]
    truncated = tmp_path / "truncated-idx1-ubyte.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 5, 7, 8]))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(truncated)
    garbage = tmp_path / "garbage-idx1-ubyte"
    garbage.write_bytes(b"not an idx file")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(garbage)
    not_gzip = tmp_path / "bad-idx1-ubyte.gz"
    not_gzip.write_bytes(b"\x1f\x8bbroken")
    with pytest.raises(DatasetError, match="damaged"):
        read_idx(not_gzip)


def test_imagefolder_needs_a_root(tmp_path):
    with pytest.raises(DatasetError, match="train/ and val/"):
        ClassificationData(name="imagefolder", root=str(tmp_path))


def write_image_folder(root, layout: dict[str, dict[str, int]]):
    """``<root>/<split>/<class>/<i>.png``: ``layout[split][class]`` small images each."""
    from PIL import Image
    for split, classes in layout.items():
        for cls, count in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (i * 30, 50, 0)).save(root / split / cls / f"{i}.png")


def files(dataset) -> list[str]:
    """The image files a (nested) Subset of an image folder reads, in its order."""
    indices = range(len(dataset))
    while isinstance(dataset, Subset):
        indices, dataset = [dataset.indices[i] for i in indices], dataset.dataset
    return [dataset.samples[i][0] for i in indices]


def test_imagefolder_reads_class_folders(tmp_path):
    write_image_folder(tmp_path, {split: {"cat": 2, "dog": 2} for split in ("train", "val")})
    data = ClassificationData(name="imagefolder", root=str(tmp_path), image_size=32, batch_size=2, val_size=1)
    assert data.info.num_classes == 2
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32


def test_imagefolder_splits_use_train_classes_hold_out_validation_and_span_classes(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 6, "b": 6, "c": 6}, "val": {"a": 2, "c": 2}})
    data = ClassificationData(name="imagefolder", root=str(tmp_path), image_size=8, batch_size=2, val_size=3,
                              limit_train=6, augment=False)
    data.setup()
    assert sorted(label for _, label in data.splits["test"]) == [0, 0, 2, 2]  # c keeps train's label, not 1
    assert all(f"{tmp_path}/val/" in f for f in files(data.splits["test"]))
    train, val = files(data.splits["train"]), files(data.splits["val"])
    assert len(val) == 3 and all(f"{tmp_path}/train/" in f for f in train + val) and not set(train) & set(val)
    assert len({f.split("/")[-2] for f in train}) > 1  # the first limit_train images span classes (files: by class)
    assert data.splits["train"].dataset.dataset.transform is data.splits["val"].dataset.transform  # augment=false
    write_image_folder(tmp_path, {"val": {"z": 1}})
    with pytest.raises(DatasetError, match=r"val has class folders that train/ lacks \(z\)"):
        ClassificationData(name="imagefolder", root=str(tmp_path), val_size=3).setup()
    shutil.rmtree(tmp_path / "val")
    (tmp_path / "val").mkdir()  # images side by side, as ILSVRC's val archive unpacks: an empty test set
    (tmp_path / "train" / "a" / "0.png").rename(tmp_path / "val" / "0.png")
    with pytest.raises(DatasetError, match=r"val holds no images in class folders \(a, b, c\); put each image"):
        ClassificationData(name="imagefolder", root=str(tmp_path), val_size=3).setup()


def test_cifar10_missing_says_where_to_put_it(tmp_path):
    data = ClassificationData(name="cifar10", root=str(tmp_path))
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        data.setup()
