"""Native launches (evonorm.triton_native, EVONORM_TRITON_LAUNCH=native) against Triton's own launches.

The "fake" tests run over a stand-in CUDA driver (benchmarks/fake_cuda.py: Triton's real compiler, driver and C
launcher over a recording libcuda), which changes the process for good, so test_native_launches_over_fake_driver
runs them in a fresh pytest process with EVONORM_FAKE_CUDA set; in this process they are skipped. On a GPU, the
CUDA tests here and in tests/test_triton_kernels.py run the layers with native launches for real (benchmarks/
gpu_check.sh: step tests-native).
"""
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evonorm import fused, triton_native
from test_fast_layers import CASES, make_pair, run, sample
from test_triton_kernels import spy_triton_stages

FAKE = os.environ.get("EVONORM_FAKE_CUDA")  # a folder for the stand-in driver: this process runs over it
fake_only = pytest.mark.skipif(not FAKE, reason="run by test_native_launches_over_fake_driver")
# whole row sets, 1x1 maps (Triton specialises L = 1 away), row sets in tiles
SHAPES = [(4, 16, 3, 5), (2, 8, 1, 1), (2, 16, 40, 40)]


def test_native_launches_over_fake_driver(tmp_path):
    """The "fake" tests of this file in a fresh process over the stand-in driver (no GPU needed)."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_fake_"],
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "EVONORM_FAKE_CUDA": str(tmp_path)},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_launch_mode_is_checked(monkeypatch):
    monkeypatch.setitem(triton_native._state, "failed", False)  # an earlier test may have found no driver
    if "EVONORM_TRITON_LAUNCH" not in os.environ:  # auto: native launches for CUDA tensors, not for CPU ones
        monkeypatch.setitem(triton_native._state, "mode", "auto")  # a benchmark test may have chosen another mode
        assert triton_native.enabled(SimpleNamespace(is_cuda=True)) and not triton_native.enabled(torch.zeros(1))
    with pytest.raises(ValueError, match="must be one of"):
        triton_native.set_launch("cpp")
    monkeypatch.setitem(triton_native._state, "mode", "nativ")
    with pytest.raises(ValueError, match="EVONORM_TRITON_LAUNCH"):
        triton_native.enabled(torch.zeros(1))


@pytest.mark.skipif(bool(FAKE) or torch.cuda.is_available(), reason="needs a process without a CUDA driver")
def test_native_launches_without_driver_warn_and_stay_off(tmp_path, monkeypatch, caplog):
    """No CUDA driver where Triton looks for one: a warning, None (the caller's Python path), and off from then on."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_LIBCUDA_PATH", str(tmp_path))  # holds no libcuda.so.1
    monkeypatch.setitem(triton_native._state, "failed", False)
    monkeypatch.setitem(triton_native._state, "mode", "native")
    layer = make_pair("b0", 8)[0]
    x = sample((2, 8, 3, 3))
    with caplog.at_level(logging.WARNING, logger="evonorm.triton_native"):
        got = triton_native.call(triton_native.BATCH, x, layer.weight, layer.bias, layer.v, layer.running_var, 0,
                                 layer.eps, layer.momentum, True)
    assert got is None and not triton_native.enabled(x)
    assert "native Triton launches failed" in caplog.text and "libcuda.so.1" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES, ids=["whole_sets", "1x1", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, training", CASES)
def test_native_launches_give_what_python_launches_give_on_cuda(name, training, dtype, shape, monkeypatch):
    """On a GPU, native calls give exactly what the Python launches give (the same kernels on the same inputs):
    output, input and parameter gradients (accumulated over three calls) and running variance."""
    monkeypatch.setitem(fused._compile_state, "mode", "auto")  # the Triton stages
    monkeypatch.setitem(triton_native._state, "failed", False)
    x, grad_y = sample(shape, dtype).cuda(), sample(shape, dtype, seed=2).cuda()
    results = {}
    for launch in ("python", "native"):
        monkeypatch.setitem(triton_native._state, "mode", launch)
        layer = make_pair(name, shape[1], training)[0].cuda()
        for _ in range(3):  # native: the first call records, the others launch natively
            state = run(layer, x, grad_y)
        results[launch] = state, type(state[0].grad_fn).__name__
    assert results["native"][1] == "CppFunction" and not triton_native._state["failed"]
    for got, want in zip(*(results[launch][0] for launch in ("native", "python"))):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------- over the stand-in
@pytest.fixture(scope="module")
def fake():
    if not FAKE:
        pytest.skip("run by test_native_launches_over_fake_driver")
    from benchmarks.fake_cuda import activate

    return activate(FAKE)


@pytest.fixture
def native(fake, monkeypatch):
    """Native launches on, no key recorded yet, and the names of the Python-path Triton stages that ran."""
    triton_native.module().clear()
    monkeypatch.setitem(triton_native._state, "mode", "native")
    monkeypatch.setitem(triton_native._state, "failed", False)
    return spy_triton_stages(monkeypatch)


def _labelled(fake, names: dict[int, str]) -> list[tuple]:
    """The recorded launches with every pointer parameter named (``names`` by address, others by order of first
    appearance) and the other parameters as their bytes."""
    others = {}
    out = []
    for launch in fake.launches():
        assert launch["params"] is not None, "a kernel of unknown parameters"
        params, at = [], 0
        for size in fake.params[launch["function"]]:
            raw = launch["params"][at:at + size]
            at += size
            if size == 8:
                address = struct.unpack("<Q", raw)[0]
                raw = names.get(address) or ("null" if address == 0 else others.setdefault(address,
                                                                                       f"other{len(others)}"))
            params.append(raw)
        out.append((launch["function"], launch["grid"], launch["block"], launch["shared"], launch["attributes"],
                    launch["stream"], tuple(params)))
    return out


@fake_only
@pytest.mark.parametrize("shape", SHAPES, ids=["whole_sets", "1x1", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, training", CASES)
def test_fake_native_call_passes_what_triton_passes(name, training, dtype, shape, fake, native):
    """The first call of a key runs the Python path (Triton's own launches) and records it; the second is one C++
    call that makes the same launches: kernel, grid, block, shared memory, stream, and every parameter's bytes as
    the compiled kernel declares them, with this call's tensors where the first had its own. Its gradients are the
    tensors its kernels wrote."""
    layer = make_pair(name, shape[1], training)[0]
    x = sample(shape, dtype).requires_grad_()
    grad_y = sample(shape, dtype, seed=2)
    calls = []
    for _ in range(2):
        native.clear()
        fake.reset()
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(grad_y)
        names = {x.data_ptr(): "x", grad_y.data_ptr(): "grad_y", y.data_ptr(): "y",
                 **{t.data_ptr(): n for n, t in layer.named_parameters()},
                 **{t.data_ptr(): n for n, t in layer.named_buffers()}}
        calls.append((list(native), type(y.grad_fn).__name__, _labelled(fake, names)))
    (first_stages, first_fn, first), (second_stages, second_fn, second) = calls
    kind = "batch" if name[0] == "b" else "sample"
    assert first_stages == [f"{kind}_forward", f"{kind}_backward"] and first_fn.startswith("EvoNorm")
    assert second_stages == [] and second_fn == "CppFunction"
    assert second == first
    # the native call's gradients: the input gradient its backward kernel wrote, parameter gradients as views of
    # the workspace its kernels wrote
    launched = {p for launch in _labelled(fake, {x.grad.data_ptr(): "grad_x", layer.weight.grad.data_ptr(): "ws"})
                for p in launch[-1]}
    assert {"grad_x", "ws"} <= launched
    assert layer.bias.grad.data_ptr() == layer.weight.grad.data_ptr() + 4 * shape[1]


@fake_only
def test_fake_native_forward_without_grad_needs_no_backward(fake, native):
    """Without autograd a forward program is enough: an eval call under no_grad is native from its second call;
    a call that needs a gradient waits for a key's backward launches."""
    layer = make_pair("s0", 16, training=False)[0]
    x = sample((3, 16, 5, 5))
    with torch.no_grad():
        layer(x)
        assert native == ["sample_forward"]
        y = layer(x)
    assert native == ["sample_forward"] and y.grad_fn is None
    layer(x.requires_grad_()).sum().backward()  # no backward program yet: the Python path records one
    assert native == ["sample_forward", "sample_forward", "sample_backward"]
    assert type(layer(x).grad_fn).__name__ == "CppFunction"


@fake_only
def test_fake_native_second_backward_copies_the_workspace(fake, native):
    """retain_graph: the second backward of a native call writes into a copy of the workspace, since the first
    one's parameter gradients are views of it."""
    layer = make_pair("b0", 16)[0]
    x = sample((4, 16, 3, 5)).requires_grad_()
    layer(x).sum().backward()  # records the key
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    fake.reset()
    y.sum().backward(retain_graph=True)
    workspace = struct.pack("<Q", layer.weight.grad.data_ptr())
    assert workspace in fake.launches()[0]["params"]
    fake.reset()
    y.sum().backward(retain_graph=True)  # accumulates into the first gradients, which stay views of the workspace
    assert workspace not in fake.launches()[0]["params"] and struct.pack("<Q", x.data_ptr()) in fake.launches()[0][
        "params"]


@fake_only
def test_fake_native_backward_is_first_order_only(fake, native):
    """As on the Python path (once_differentiable): under create_graph a native call's gradients raise when
    differentiated again, rather than pass for constants."""
    layer = make_pair("s0", 8)[0]
    x = sample((2, 8, 3, 3)).requires_grad_()
    layer(x).square().sum().backward()  # records the key (an aligned gradient, as below)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@fake_only
def test_fake_native_leaves_transforms_to_the_python_path(fake, native):
    """torch.func transforms and forward-mode AD get the Python path's error, and native launches stay on (a failure
    of the C++ autograd function would have turned them off)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    layer = make_pair("b0", 8)[0]
    x = sample((2, 8, 3, 3))
    layer(x.requires_grad_()).sum().backward()  # records the key
    params = {k: v.detach() for k, v in layer.named_parameters()}
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda p: functional_call(layer, p, (x.detach(),)).sum())(params)
    with pytest.raises(RuntimeError, match="jvp"), fwAD.dual_level():
        layer(fwAD.make_dual(x.detach(), torch.ones_like(x)))
    assert triton_native.enabled(x) and type(layer(x).grad_fn).__name__ == "CppFunction"


@fake_only
def test_fake_native_refuses_kernels_that_declare_other_parameters(fake, native, caplog, monkeypatch):
    """A kernel whose declared parameters differ from the recorded arguments (another Triton's packing) is never
    launched natively: a warning, and the Python path from then on."""
    from evonorm import triton_kernels

    layer = make_pair("b2", 24)[0]
    x = sample((5, 24, 3, 3), torch.float16).requires_grad_()
    original = triton_native._program

    def one_more_argument(launches, slots):
        for compiled, _, _ in launches:  # a kernel that takes one more 4-byte parameter than Triton packs
            fake.set_params(compiled.function, [4, *fake.params[compiled.function]])
        return original(launches, slots)

    monkeypatch.setattr(triton_native, "_program", one_more_argument)
    with caplog.at_level(logging.WARNING, logger="evonorm.triton_native"):
        layer(x).sum().backward()
    assert "native Triton launches failed" in caplog.text and "bytes" in caplog.text
    assert not triton_native.enabled(x) and triton_native.module().program_count() == 0
    assert not fused._triton_state["failed"] and triton_kernels.RECORDED is None
