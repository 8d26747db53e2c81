"""The compiled path (``compile=true``): the task's model compiled in place trains like the eager one, keeps its
checkpoint keys and is recorded; the EvoNorm layers trace whole (no graph breaks). Inductor compiles C++ on CPU,
so the models are tiny and each graph compiles once."""
import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters

import evonorm
from pipelines.run import resolve_compile, run

# 4 training steps of 32 images, one evaluation batch of 64 for val and test: one train graph and one eval graph
TINY_RUN = ("norm=b0", "task.model.width=4", "task.data.limit_train=128", "task.data.batch_size=32",
            "task.data.limit_eval=64", "task.data.eval_batch_size=64", "test_ckpt=last")


def test_compile_default_follows_the_trainer(compose_cfg):
    assert not resolve_compile(compose_cfg())  # trainer=cpu
    assert resolve_compile(compose_cfg("trainer=gpu")) and resolve_compile(compose_cfg("trainer=ddp"))
    assert resolve_compile(compose_cfg("compile=true"))
    assert not resolve_compile(compose_cfg("trainer=gpu", "compile=false"))
    with pytest.raises(ValueError, match="compile must be true, false or null"):
        resolve_compile(compose_cfg("compile=sometimes"))


def test_compiled_run_trains_like_the_eager_one(compose_cfg, tmp_path):
    eager = run(compose_cfg(*TINY_RUN, output_dir=tmp_path / "eager"))
    # an earlier compile of this model in the process (tests/test_model_benchmark.py, when it runs first) leaves
    # dims marked dynamic, whose guards inductor 2.14 fails to decide ("cannot determine truth value of Relational")
    torch._dynamo.reset()
    counters.clear()
    compiled = run(compose_cfg(*TINY_RUN, "compile=true", output_dir=tmp_path / "compiled"))
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]  # train and eval, whole
    saved = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert saved["status"] == "completed" and saved["compile"] is True and saved["compiled_modules"] == ["model"]
    assert eager["compile"] is False and eager["compiled_modules"] == []
    assert compiled["steps"] == eager["steps"] == 4
    assert compiled["test"]["test/loss"] == pytest.approx(eager["test"]["test/loss"], rel=1e-4)
    weights = {name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for name in ("eager", "compiled")}
    assert weights["compiled"].keys() == weights["eager"].keys()  # no _orig_mod. prefix: checkpoints interchange
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["b0", "s0"])
def test_evonorm_compiles_without_graph_breaks(name):
    """Forward and backward in training mode under fullgraph=True (a graph break raises) match the eager layer."""
    torch.manual_seed(0)
    eager = evonorm.norm_act(name, 8).train()
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 8, 5, 5)
    grad_out = torch.randn(4, 8, 5, 5)
    outputs, inputs = [], []
    for module in (eager, compiled):
        inputs.append(x.clone().requires_grad_())
        outputs.append(module(inputs[-1]))
        outputs[-1].backward(grad_out)
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad)
    for (key, got), want in zip(layer.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=key)
    for (key, got), want in zip(layer.named_buffers(), eager.buffers()):  # B0: the running-variance update
        torch.testing.assert_close(got, want, msg=key)
