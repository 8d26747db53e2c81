"""The channels-last path (``channels_last=``): auto picks it for a CPU trainer and a model with depthwise
convolutions; a run on it is recorded, trains like the contiguous one and saves the same checkpoint keys."""
import json

import pytest
import torch

import evonorm
from pipelines.checks import ConfigError
from pipelines.run import apply_channels_last, run
from tasks.classification.models import build_model

# 4 training steps of 32 images of a narrow MobileNetV2 (depthwise convolutions), one evaluation batch of 64
TINY_MOBILENET = ("norm=s0", "task.model.arch=mobilenet_v2", "task.model.width_mult=0.25", "task.model.depth_mult=0.34",
                  "task.data.limit_train=128", "task.data.batch_size=32", "task.data.limit_eval=64",
                  "task.data.eval_batch_size=64", "test_ckpt=last")


def weights_channels_last(weights) -> bool:
    """Whether every 4-d tensor has channels-last strides (not merely is_contiguous(channels_last), which holds
    either way for MobileNetV2's weights: 1x1 kernels or one input channel)."""
    weights = [w for w in weights if w.dim() == 4]
    return bool(weights) and all(w.stride() == torch.empty(w.shape, memory_format=torch.channels_last).stride()
                                 for w in weights)


def test_channels_last_default_follows_the_model_and_the_trainer(compose_cfg):
    factory = evonorm.norm_act_factory("s0")
    mobile, resnet = (build_model(arch, factory, 10, in_chans=1) for arch in ("mobilenet_v2", "preact_resnet_cifar"))
    for overrides, model, on in ((["trainer=gpu"], mobile, False), (["channels_last=false"], mobile, False),
                                 ([], mobile, True), ([], resnet, False), (["channels_last=true"], resnet, True)):
        assert apply_channels_last(compose_cfg(*overrides), model) == on
        assert weights_channels_last(model.parameters()) == on, (overrides, type(model).__name__)
    with pytest.raises(ConfigError, match="channels_last must be true, false or null"):
        apply_channels_last(compose_cfg("channels_last=sometimes"), mobile)


def test_a_channels_last_run_trains_like_the_contiguous_one(compose_cfg, tmp_path):
    auto = run(compose_cfg(*TINY_MOBILENET, output_dir=tmp_path / "auto"))
    contiguous = run(compose_cfg(*TINY_MOBILENET, "channels_last=false", output_dir=tmp_path / "contiguous"))
    saved = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert saved["status"] == "completed" and saved["channels_last"] is True and contiguous["channels_last"] is False
    assert auto["steps"] == contiguous["steps"] == 4
    assert auto["test"]["test/loss"] == pytest.approx(contiguous["test"]["test/loss"], rel=1e-4)
    weights = {name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for name in ("auto", "contiguous")}
    assert weights["auto"].keys() == weights["contiguous"].keys()
    assert weights_channels_last(weights["auto"].values()) and not weights_channels_last(weights["contiguous"].values())
    for key, value in weights["contiguous"].items():  # depthwise backward sums in another order: rounding, 4 steps
        torch.testing.assert_close(weights["auto"][key].contiguous(), value, rtol=1e-3, atol=5e-5, msg=key)
