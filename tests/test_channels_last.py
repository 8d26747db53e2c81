"""The channels-last path (``channels_last=``): auto picks it for a CPU trainer and a model with depthwise
convolutions; a run on it is recorded, trains like the contiguous one and saves the same checkpoint keys."""
import json

import pytest
import torch

import evonorm
from pipelines.checks import ConfigError
from pipelines.run import resolve_channels_last, run
from tasks.classification.models import build_model

# 4 training steps of 32 images of a narrow MobileNetV2 (depthwise convolutions), one evaluation batch of 64
TINY_MOBILENET = ("norm=s0", "task.model.arch=mobilenet_v2", "task.model.width_mult=0.25", "task.model.depth_mult=0.34",
                  "task.data.limit_train=128", "task.data.batch_size=32", "task.data.limit_eval=64",
                  "task.data.eval_batch_size=64", "test_ckpt=last")


def test_channels_last_default_follows_the_model_and_the_trainer(compose_cfg):
    factory = evonorm.norm_act_factory("s0")
    mobile, resnet = (build_model(arch, factory, 10, in_chans=1) for arch in ("mobilenet_v2", "preact_resnet_cifar"))
    assert resolve_channels_last(compose_cfg(), mobile) and not resolve_channels_last(compose_cfg(), resnet)
    assert not resolve_channels_last(compose_cfg("trainer=gpu"), mobile)
    assert resolve_channels_last(compose_cfg("channels_last=true"), resnet)
    assert not resolve_channels_last(compose_cfg("channels_last=false"), mobile)
    with pytest.raises(ConfigError, match="channels_last must be true, false or null"):
        resolve_channels_last(compose_cfg("channels_last=sometimes"), mobile)


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
    convs = [k for k, v in weights["auto"].items() if v.dim() == 4]
    assert convs and all(weights["auto"][k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    for key, value in weights["contiguous"].items():  # depthwise backward sums in another order: rounding, 4 steps
        torch.testing.assert_close(weights["auto"][key].contiguous(), value, rtol=1e-3, atol=5e-5, msg=key)
