"""Device operations of one forward + backward on the CUDA code path (the Triton kernels; under the interpreter on
CPU): ATen operations seen by a TorchDispatchMode, plus Triton launches (the ATen work the interpreter does inside a
launch is not counted). A proxy for the fixed per-call cost on a GPU, where each operation costs a launch or an
allocator call and the Python around it. BN-ReLU takes 11 (5 of them detaches of the leaves' gradients).

The "interp" cases run in test_triton_kernels.py::test_interpreter_run's subprocess (TRITON_INTERPRET=1).
"""
import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import evonorm
from evonorm import fused
from test_fast_layers import sample
from test_triton_kernels import DEVICES

BUDGET = {"b0": 12, "s0": 12, "b1": 12, "b2": 12, "s1": 12, "s2": 12}


class OperationLog(TorchDispatchMode):
    """Names of the ATen operations and Triton launches in order; ATen work inside a launch is not logged."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def operation_log(monkeypatch):
    pytest.importorskip("triton")
    from evonorm import triton_kernels

    log = OperationLog()
    launch = triton_kernels._launch

    def logged_launch(kernel, *args, **meta):
        log.names.append(f"triton.{kernel.fn.__name__}")
        log.in_launch = True
        try:
            launch(kernel, *args, **meta)
        finally:
            log.in_launch = False

    monkeypatch.setattr(triton_kernels, "_launch", logged_launch)
    monkeypatch.setitem(fused._triton_state, "force", True)
    monkeypatch.setitem(fused._triton_state, "failed", False)
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    return log


def forward_backward_operations(log, name, device, training=True, shape=(4, 16, 5, 3)):
    layer = evonorm.norm_act(name, shape[1]).to(device).train(training)
    x = sample(shape).to(device).requires_grad_()
    grad_y = sample(shape, seed=2).to(device)
    layer(x).backward(grad_y)  # first call: kernel compilation, lazy initialisation
    x.grad = None
    layer.zero_grad(set_to_none=True)
    log.names.clear()  # the launches of the first call
    with log:
        layer(x).backward(grad_y)
    return log.names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 16, 5, 3), (2, 16, 40, 40)], ids=["whole_sets", "tiles"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BUDGET))
def test_forward_backward_operation_count(name, training, shape, device, operation_log):
    """Four launches (two forward, two backward); where each row set fits one tile (5x3 maps), one forward and,
    B-series, one backward: each launch saved is an operation fewer."""
    names = forward_backward_operations(operation_log, name, device, training, shape)
    launches = [n for n in names if n.startswith("triton.")]
    expected = 4 if shape[2] > 5 else 2 if name.startswith("b") else 3
    assert len(launches) == expected, names
    assert len(names) <= BUDGET[name] - (4 - expected), names


def test_bn_relu_count_is_the_yardstick(operation_log):
    """BN-ReLU's forward + backward on CPU, counted the same way: the 11 the budget above is measured against."""
    assert len(forward_backward_operations(operation_log, "bn_relu", "cpu")) == 11
