"""evonorm.convert on torchvision and timm classifiers (no BatchNorm left, the expected activations folded in,
bn_relu the identity), what it refuses and reports, and library models in the tasks: classification by name, weights
by path, the input conv adapted, Mask R-CNN backbones. Small inputs (2x3x32x32) and each model built once."""
import copy
import json
import logging
from functools import cache

import pytest
import timm
from hydra import compose, initialize_config_dir
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import evonorm
from evonorm.convert import ConversionError, convert
from pipelines.checks import check_config
from pipelines.run import run
from tasks.classification.models import build_model
from tasks.common.backbones import preact_resnet
from tasks.common.library_models import feature_extractor, library_model
from tasks.common.weights import WeightsError
from tasks.maskrcnn.model import build_maskrcnn

from conftest import CONF_DIR
from test_maskrcnn import TINY_MODEL, classification_checkpoint, tiny_batch

# norms, and those whose output feeds only an activation (what an EvoNorm folds in), counted from each model's
# definition; "relu only": what bn_relu folds (ReLU6, SiLU and Hardswish stay after a BN)
MODELS = {  # name: (norms, folded by an EvoNorm, folded by bn_relu)
    # stem + per block bn1 (and bn2 of a bottleneck); the bn after the last conv and the shortcut bn: before the add
    "torchvision:resnet18": (20, 1 + 8, 9),
    "torchvision:resnet50": (53, 1 + 16 * 2, 33),
    "torchvision:resnext50_32x4d": (53, 1 + 16 * 2, 33),
    # ReLU6: stem, the first block's depthwise, expansion + depthwise of 16 blocks, the last 1x1; 17 linear bottlenecks
    "torchvision:mobilenet_v2": (52, 1 + 1 + 16 * 2 + 1, 0),
    # Hardswish stem and last conv, ReLU / Hardswish in 11 blocks (the first without expansion)
    "torchvision:mobilenet_v3_small": (34, 1 + 1 + 10 * 2 + 1, 5),
    "torchvision:efficientnet_b0": (49, 1 + 1 + 15 * 2 + 1, 0),  # SiLU, as MobileNetV2's positions
    "torchvision:mnasnet1_0": (52, 1 + 1 + 16 * 2 + 1, 35),  # ReLU: stem, separable conv, 16 blocks, last conv
    "torchvision:regnet_y_400mf": (53, 1 + 16 * 2, 33),  # stem, a and b of 16 blocks; c and 4 projections: before add
    # conv1 and conv5, 2 of 3 in each of 16 blocks' branch2, the 1x1 of each stage's first block's branch1
    "torchvision:shufflenet_v2_x1_0": (56, 2 + 16 * 2 + 3, 37),
    "torchvision:densenet121": (121, 121, 121),  # every norm -> ReLU (norm5 -> F.relu in forward)
    "timm:resnet50": (53, 1 + 16 * 2, 33),  # bn2 -> drop_block (Identity) -> act2: folded through the Identity
    "timm:efficientnet_b0": (49, 1 + 1 + 15 * 2 + 1, 0),  # BatchNormAct2d with SiLU inside
    "timm:mobilenetv3_large_100": (46, 1 + 1 + 14 * 2 + 1, 11),  # its last stage: a ConvBnAct 1x1 to 960
    "timm:regnety_004": (53, 1 + 16 * 2, 33),  # BatchNormAct2d, as torchvision's RegNet
}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@cache
def library_classifier(arch: str) -> nn.Module:
    """The library's model (10 classes) with random norm statistics and affine, in eval mode; copy before use."""
    library, _, name = arch.partition(":")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10) if library == "torchvision" else timm.create_model(
        name, num_classes=10)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", MODELS)
def test_every_norm_converts_bn_relu_is_the_identity_and_an_evonorm_trains(arch):
    norms, folded, folded_by_bn_relu = MODELS[arch]
    original = library_classifier(arch)
    same, conversion = convert(copy.deepcopy(original), "bn_relu")
    assert len(conversion.positions) == norms and len(conversion.folded) == folded_by_bn_relu and not conversion.left
    assert all(type(m) is not nn.BatchNorm2d for m in same.modules())
    torch.testing.assert_close(same(X), original(X), rtol=1e-5, atol=1e-5)
    theirs = original.state_dict()
    assert set(same.state_dict()) == set(theirs)  # the parameter and buffer names are the model's
    for key, value in same.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    converted, conversion = convert(copy.deepcopy(original).train(), "b0")
    assert len(conversion.positions) == norms and len(conversion.folded) == folded and not conversion.left
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, evonorm.EvoNormB0) for m in converted.modules()) == norms
    out = converted(X)
    out.sum().backward()
    assert out.shape == (2, 10) and all(p.grad is not None for p in converted.parameters())


def test_shared_and_functional_activations_and_parameter_names():
    """torchvision's ResNet calls one ReLU after bn1 and after the add: the first call goes, the second stays;
    DenseNet's last norm feeds F.relu; EvoNorm layers keep the norm's name, with its affine."""
    resnet = library_classifier("torchvision:resnet18")
    converted, conversion = convert(copy.deepcopy(resnet), "s0")
    relu_calls = [n for n in converted.graph.nodes if n.op == "call_module" and n.target.endswith("relu")]
    assert len(relu_calls) == 8  # one per block, after the add
    assert {p.name: p.feeds for p in conversion.positions}["layer1.0.bn2"] == "add"  # out += identity
    assert torch.equal(converted.get_submodule("layer1.0.bn2").weight, resnet.layer1[0].bn2.weight)
    expected = {k for k in resnet.state_dict() if not k.endswith(("running_mean", "running_var",
                                                                  "num_batches_tracked"))}
    expected |= {p.name + ".v" for p in conversion.folded}  # S0's v, where it has its activation
    assert set(converted.state_dict()) == expected
    _, dense = convert(library_classifier("torchvision:densenet121"), "b0", dry_run=True)
    assert next(p for p in dense.positions if p.name == "features.norm5").folded


def test_other_activations_are_replaced_and_said_so(caplog):
    with caplog.at_level(logging.INFO, logger="evonorm.convert"):
        _, conversion = convert(copy.deepcopy(library_classifier("timm:efficientnet_b0")), "s0")
    assert {p.activation for p in conversion.replaced} == {"silu"}
    assert "silu replaced by s0's own nonlinearity (the paper's protocol)" in caplog.text
    _, kept = convert(library_classifier("timm:efficientnet_b0"), "bn_relu", dry_run=True)
    assert len(kept.kept) == 33 and "silu kept after apply_act=False layers" in kept.summary()


def test_a_functional_dropout_follows_the_converted_models_mode():
    """timm's drop_rate: F.dropout(x, p, training=self.training) in the model's forward becomes an nn.Dropout."""
    torch.manual_seed(0)
    model, conversion = convert(timm.create_model("mobilenetv3_small_050", num_classes=10, drop_rate=0.5), "b0")
    assert conversion.dropouts == ["dropout"] and isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert not torch.equal(model(X), model(X))
    model.eval()
    assert torch.equal(model(X), model(X))


def test_dry_run_lists_positions_and_changes_nothing():
    model = library_classifier("torchvision:mobilenet_v2")
    state = copy.deepcopy(model.state_dict())
    same, conversion = convert(model, "b0", dry_run=True)
    assert same is model and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    lines = conversion.table().splitlines()
    assert len(lines) == 52
    assert lines[0] == "features.0.1\t32\tBatchNorm2d\tfolded relu6\trelu6 replaced by b0's own nonlinearity"
    assert lines[2] == "features.1.conv.2\t16\tBatchNorm2d\tapply_act=False\tits output feeds features.2.conv.0.0"
    assert lines[5] == "features.2.conv.3\t24\tBatchNorm2d\tapply_act=False\tits output feeds 2 nodes"


class Unconvertible(nn.Module):
    """A BatchNorm1d, a norm called twice, a GroupNorm, and what converts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        x = nn.functional.silu(self.bn(self.conv(x)))
        x = self.shared(self.shared(x)).relu()
        x = torch.relu(self.gn(x))
        return self.bn1d(self.head(x.mean((2, 3))))


def test_norms_that_cannot_convert_are_left_with_why():
    model, conversion = convert(Unconvertible(), "b0")
    assert [(p.name, p.activation, p.folded) for p in conversion.positions] == [("bn", "silu", True)]
    assert conversion.left == {"shared": "called at 2 places (one layer cannot be two positions)",
                               "gn": "a GroupNorm (convert with groupnorm=True)",
                               "bn1d": "a BatchNorm1d (the layers take (N, C, H, W) inputs)"}
    assert "3 left as they are" in conversion.summary()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    _, with_gn = convert(Unconvertible(), "gn_relu", groupnorm=True)
    assert ("gn", "relu", True) in [(p.name, p.activation, p.folded) for p in with_gn.positions]


class BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.block(x) if x.sum() > 0 else x


class BranchesOnMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) if self.training else x


def test_untraceable_models_are_refused_naming_where():
    wrapped = nn.Sequential(nn.Identity(), BranchesOnValues())
    with pytest.raises(ConversionError, match=r"Sequential cannot be traced with torch.fx.*in 1 \(BranchesOnValues\)"
                                              r".*convert the model's traceable submodules"):
        convert(wrapped, "b0")
    with pytest.raises(ConversionError, match="traces differently in training and eval mode"):
        convert(nn.Sequential(BranchesOnMode()), "b0")


def test_converted_model_compiles_saves_and_loads(tmp_path):
    """Dynamo captures the converted graph whole (fullgraph: a graph break raises); the eager backend keeps the
    test short (inductor compiling the EvoNorm layers: tests/test_compile.py)."""
    torch.manual_seed(0)
    model, _ = convert(torchvision.models.resnet18(num_classes=10), "s0")
    compiled = torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True)
    for module in (model, compiled):
        module(X).sum().backward()
    torch.testing.assert_close(compiled.eval()(X), model.eval()(X))
    torch.save(model.state_dict(), tmp_path / "converted.pt")
    fresh, _ = convert(torchvision.models.resnet18(num_classes=10), "s0")
    fresh.load_state_dict(torch.load(tmp_path / "converted.pt"))
    torch.testing.assert_close(fresh.eval()(X), model.eval()(X))


def test_library_classifier_by_name_with_weights_by_path(tmp_path, caplog):
    pretrained = torchvision.models.resnet18()  # a library's weights file: 1000 classes, 3 channels
    torch.save(pretrained.state_dict(), tmp_path / "resnet18.pth")
    with caplog.at_level(logging.INFO):
        model = build_model("torchvision:resnet18", evonorm.norm_act_factory("b0"), 10, in_chans=1,
                            weights=str(tmp_path / "resnet18.pth"))
    assert "classifier fc left at its init" in caplog.text and "from 3 to 1 input channels" in caplog.text
    assert torch.equal(model.conv1.weight, pretrained.conv1.weight.sum(1, keepdim=True))
    bn1 = model.get_submodule("layer1.0.bn1")  # the converted model's containers are plain modules: no indexing
    assert torch.equal(bn1.weight, pretrained.layer1[0].bn1.weight)
    assert torch.equal(bn1.running_var, pretrained.layer1[0].bn1.running_var)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}, tmp_path / "run.ckpt")
    again = build_model("torchvision:resnet18", evonorm.norm_act_factory("b0"), 10, in_chans=1,
                        weights=str(tmp_path / "run.ckpt"))  # a converted model's checkpoint: after conversion
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(WeightsError, match=r"layer1.0.conv1.weight is \(64, 3, 7, 7\) there and \(64, 64, 3, 3\) here"):
        state = torchvision.models.resnet18().state_dict()
        state["layer1.0.conv1.weight"] = torch.zeros(64, 3, 7, 7)
        torch.save(state, tmp_path / "broken.pth")
        build_model("torchvision:resnet18", evonorm.norm_act_factory("b0"), 10, weights=str(tmp_path / "broken.pth"))


@pytest.mark.parametrize("arch, kwargs, message", [
    ("torchvision:resnet1000", {}, r"no classifier 'resnet1000' \(close: .*resnet101.*list_models\(module=torchvision"),
    ("timm:efficientnet_b9", {}, r"timm.list_models\(\) lists them"),
    ("torchvision:resnet18", {"width_mult": 0.5}, r"does not take task.model.kwargs=\{'width_mult': 0.5\}"),
    ("torchvision:mobilenet_v2", {"width": 8}, r"task.model.width=8: set for this project's models.*kwargs"),
    ("mobilenet_v2", {"kwargs": {"width_mult": 0.5}}, r"go to a torchvision or timm model's constructor"),
    ("torchvision:squeezenet1_1", {}, r"has no BatchNorm2d for the layer to replace: choose a model with BatchNorm"),
])
def test_bad_model_choices_say_what_to_do(arch, kwargs, message):
    options = {"kwargs": kwargs} if arch.startswith(("torchvision", "timm")) and "width" not in kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        build_model(arch, evonorm.norm_act_factory("b0"), 10, **options)


def test_classification_run_with_a_library_model(compose_cfg, tmp_path):
    """Through the pipeline: converted, its stem adapted to 1 channel, drop_rate passed, checkpointed."""
    overrides = ("task.model.arch=timm:mobilenetv3_small_050", "norm=s0", "task.data.limit_train=128",
                 "task.data.limit_eval=64", "task.data.resize=32", "task.model.kwargs={drop_rate:0.1}",
                 "task.model.width=16")  # the smoke runs' width is for this project's models
    record = run(compose_cfg(*overrides))
    assert record["status"] == "completed" and record["model"] == "timm:mobilenetv3_small_050(drop_rate=0.1)"
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert "model.conv_stem.weight" in state and state["model.conv_stem.weight"].shape[1] == 1
    assert any(k.endswith(".v") for k in state) and not any(k.endswith("running_mean") for k in state)


def test_config_check_takes_the_new_keys(compose_cfg):
    check_config(compose_cfg("task.model.arch=torchvision:mobilenet_v2", "task.model.kwargs={width_mult:0.5}",
                             "task.data.resize=64", "task.model.weights=/w.pth"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        check_config(compose("config", overrides=["task=maskrcnn", "task.model.arch=timm:resnet50",
                                                  "task.model.kwargs={drop_rate:0.1}", "output_dir=."]))
    with pytest.raises(ValueError, match="did you mean task.data.resize=64"):
        check_config(compose_cfg("+task.data.resise=64"))


def test_resize_upsamples_the_in_memory_batches():
    from tasks.classification.data import ClassificationData
    data = ClassificationData(resize=40)
    images, _ = data.on_after_batch_transfer((torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2)), 0)
    assert images.shape == (2, 1, 40, 40)
    with pytest.raises(ValueError, match="task.data.image_size"):
        ClassificationData(name="imagefolder", resize=64)


def test_feature_maps_are_the_stage_outputs():
    model = library_model("torchvision:resnet18", evonorm.norm_act_factory("b0"), 10, 3)
    body, channels = feature_extractor(model)
    maps = body(torch.randn(1, 3, 64, 64))
    assert channels == [64, 128, 256, 512] and [m.shape[-1] for m in maps.values()] == [16, 8, 4, 2]
    assert not hasattr(body, "fc") and hasattr(body.get_submodule("layer4.1"), "bn2")  # the classifier is gone, names are kept


def test_classification_checkpoint_of_one_channel_starts_a_three_channel_detector(tmp_path, caplog):
    """The user's defect: a Fashion-MNIST run's 1-channel stem is adapted, not refused as "other shape"."""
    run_dir = tmp_path / "cls"
    (run_dir / "checkpoints").mkdir(parents=True)
    model = preact_resnet("preact_resnet18", evonorm.norm_act_factory("b0"), 10, in_chans=1)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "results.json").write_text(json.dumps({"model": "preact_resnet18", "norm": {"name": "b0"}}))
    with caplog.at_level(logging.INFO):
        detector = build_maskrcnn(evonorm.norm_act_factory("b0"), 3, backbone_ckpt=str(
            run_dir / "checkpoints" / "last.ckpt"), **TINY_MODEL)
    assert "input conv stem.0 takes 1 channels there and 3 here: adapted" in caplog.text
    torch.testing.assert_close(detector.backbone.body.stem[0].weight, model.stem[0].weight.repeat(1, 3, 1, 1) / 3)
    ckpt, _ = classification_checkpoint(tmp_path, "preact_resnet18", "b0")
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"]["model.stages.0.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"stages.0.0.conv1.weight is \(64, 64, 1, 1\) there and \(64, 64, 3, 3\) "
                                         r"here") as error:
        build_maskrcnn(evonorm.norm_act_factory("b0"), 3, backbone_ckpt=str(ckpt), **TINY_MODEL)
    assert "Train the classification run" not in str(error.value)


def test_library_backbone_from_a_library_classification_run(tmp_path):
    classifier = library_model("torchvision:resnet18", evonorm.norm_act_factory("s0"), 10, 1)
    run_dir = tmp_path / "cls"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"model." + k: v for k, v in classifier.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "results.json").write_text(json.dumps({"model": "torchvision:resnet18", "norm": {"name": "s0"}}))
    detector = build_maskrcnn(evonorm.norm_act_factory("s0"), 3, arch="torchvision:resnet18",
                              backbone_ckpt=str(run_dir / "checkpoints" / "last.ckpt"), **TINY_MODEL)
    assert torch.equal(detector.backbone.body.get_submodule("layer4.1.bn2").weight,
                       classifier.get_submodule("layer4.1.bn2").weight)
    assert isinstance(detector.backbone.body.get_submodule("layer1.0.bn1"), evonorm.EvoNormS0)
    losses = detector.train()(*tiny_batch())
    sum(losses.values()).backward()
    with pytest.raises(ValueError, match="comes from a run of model torchvision:resnet18, layer s0; this backbone is "
                                         "model torchvision:resnet18, layer b0"):
        build_maskrcnn(evonorm.norm_act_factory("b0"), 3, arch="torchvision:resnet18",
                       backbone_ckpt=str(run_dir / "checkpoints" / "last.ckpt"), **TINY_MODEL)
