"""Classification models and data: the factory is used at every norm position; data errors are clear."""
import gzip
import logging

import pytest
import torch
from torch import nn

import evonorm
from tasks.classification.data import ClassificationData, random_crop_flip
from tasks.common.datasets import DatasetError, read_idx
from tasks.classification.models import build_model

ARCHS = ["preact_resnet18", "preact_resnet50", "preact_resnet_cifar", "mobilenet_v2"]


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


@pytest.mark.parametrize("arch", ["preact_resnet50", "mobilenet_v2"])
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


def test_unknown_arch():
    with pytest.raises(ValueError, match="preact_resnet50"):
        build_model("resnet1000", evonorm.norm_act_factory("b0"), 10)


def test_random_crop_flip_keeps_pixels():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for img, src in zip(out, x):  # every non-padding value comes from the same image and channel
        nonzero = img[img != 0]
        assert torch.isin(nonzero, src).all()
        assert torch.isin(img[0][img[0] != 0], src[0]).all()


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


@pytest.mark.parametrize("settings", [{"val_size": 100_000}, {"limit_train": 100, "batch_size": 128}])
def test_a_training_split_without_one_batch_is_refused(settings):
    data = ClassificationData(**settings)
    with pytest.raises(DatasetError, match=r"fewer than task.data.batch_size=128; lower it or task.data.val_size"):
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


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 100, 50, 0)).save(tmp_path / split / cls / f"{i}.png")
    data = ClassificationData(name="imagefolder", root=str(tmp_path), image_size=32, batch_size=2)
    assert data.info.num_classes == 2
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32


def test_cifar10_missing_says_where_to_put_it(tmp_path):
    data = ClassificationData(name="cifar10", root=str(tmp_path))
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        data.setup()
