"""The Triton path of the fast layers (evonorm.triton_kernels) against impl="reference": outputs, input and
parameter gradients, running variance, half inputs, fallbacks.

Every test runs on two devices: "cuda" (skipped without a GPU) and "interp", CPU tensors under the Triton
interpreter. The interpreter must be switched on (TRITON_INTERPRET=1) before the kernels are decorated, and torch
may already have imported triton in this process, so test_interpreter_run runs the "interp" cases of this file and
of test_op_count.py in a fresh pytest process with the variable set; in this process they are skipped.
"""
import contextlib
import logging
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from evonorm import fused
from test_fast_layers import CASES, make_pair, run, sample

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(not INTERPRETED, reason="run by test_interpreter_run")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
# layer inputs: groups 20 with 7x5 maps, 1x1 maps, rows longer than one tile, batch larger than one reduction step
# (REDUCE_BLOCK samples)
LAYER_SHAPES = [(4, 40, 7, 5), (2, 8, 1, 1), (2, 6, 20, 55), (70, 4, 2, 3)]
INTERP_FILES = ["tests/test_triton_kernels.py", "tests/test_op_count.py"]


def spy_triton_stages(monkeypatch) -> list[str]:
    """The names of the evonorm.triton_kernels functions that the Python path runs from now on (a list that grows)."""
    called = []
    run_triton = fused._run_triton

    def spy(name, *args):
        called.append(name)
        return run_triton(name, *args)

    monkeypatch.setattr(fused, "_run_triton", spy)
    return called


@pytest.fixture(params=["whole_sets", "tiles"])
def triton_stages(request, monkeypatch):
    """Names of the evonorm.triton_kernels functions that ran; Triton forced for CPU tensors (interpreter). Each
    test runs twice: with the default plans ("whole_sets": where a row set fits one tile, as on most maps of these
    tests, it is taken whole) and with every row set in tiles (WHOLE_SET_TILE 0)."""
    pytest.importorskip("triton")
    from evonorm import triton_kernels

    if request.param == "tiles":
        monkeypatch.setattr(triton_kernels, "WHOLE_SET_TILE", 0)
    triton_kernels._plan.cache_clear()
    request.addfinalizer(triton_kernels._plan.cache_clear)
    called = spy_triton_stages(monkeypatch)
    monkeypatch.setitem(fused._triton_state, "force", True)
    monkeypatch.setitem(fused._triton_state, "failed", False)
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    return called


@contextlib.contextmanager
def simulated_cuda_launches(record: list | None = None):
    """The Triton stages on CPU tensors through Triton's launch path, with a stand-in CUDA driver (device 0, stream
    0, sm_90) and, for each kernel compilation, a compiled kernel whose launcher appends its arguments to ``record``
    (a list) or does nothing: nothing compiles, and unlike benchmarks/fake_cuda.py it is undone on exit (Triton's
    driver, the kernels' caches and the module's compiled-kernel table), so it runs in the tests' own process."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import CompiledKernel
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from evonorm import triton_kernels

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class RecordingKernel(CompiledKernel):
        def __init__(self, name: str):  # only what a launch reads
            self.name, self.src, self.metadata, self.hash = name, None, None, name
            self.module, self.function, self.packed_metadata = name, id(self), ()
            self._run = (lambda *args: record.append(args)) if record is not None else (lambda *args: None)

        def __del__(self):  # nothing was loaded
            pass

    def compile_stub(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = RecordingKernel(self.__name__)
        self.device_caches[device][0][key] = kernel
        return kernel

    kernels = [k for k in vars(triton_kernels).values() if isinstance(k, JITFunction)]
    saved_caches = [k.device_caches for k in kernels]
    saved_driver, saved_compiled = driver._active, dict(triton_kernels._compiled)
    saved_state, saved_compile = dict(fused._triton_state), JITFunction._do_compile
    driver.set_active(Driver())
    JITFunction._do_compile = compile_stub
    triton_kernels._compiled.clear()
    for k in kernels:
        k.device_caches = defaultdict(k.create_binder)
    fused._triton_state.update(force=True, failed=False)
    try:
        yield
    finally:
        fused._triton_state.update(saved_state)
        JITFunction._do_compile = saved_compile
        driver._active = saved_driver
        triton_kernels._compiled.clear()
        triton_kernels._compiled.update(saved_compiled)
        for k, caches in zip(kernels, saved_caches):
            k.device_caches = caches


def assert_close(got, want, tol=1e-5):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_interpreter_run():
    """The "interp" cases of this file in a fresh process under TRITON_INTERPRET=1 (CPU, no GPU needed)."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *INTERP_FILES, "-q", "-p", "no:cacheprovider",
         "-k", "interp and not test_interpreter_run"],
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("name, training", CASES)
def test_fast_layers_on_triton_match_reference(name, training, shape, device, triton_stages):
    fast, ref = (layer.to(device) for layer in make_pair(name, shape[1], training))
    x, grad_y = sample(shape).to(device), sample(shape, seed=2).to(device)
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):  # y, x.grad, parameter grads, running var
        assert_close(got, want)
    kind = "batch" if name[0] == "b" else "sample"
    assert triton_stages == [f"{kind}_forward", f"{kind}_backward"]
    assert not fused._triton_state["failed"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["s0", "s2", "b0", "b2"])
@pytest.mark.parametrize("maps", ["1x1", "5x7"])
def test_large_groups_reduce_in_several_steps(name, maps, device, triton_stages):
    """B-series: a batch of 40, S-series: 80 channels per group. With 1x1 maps a tile holds many rows (on an H200
    such a tile once summed only every 4th sample), with 5x7 maps a row set (a channel's 40 samples, a group's 80
    channels) spans several tiles; the group reductions take several steps of REDUCE_BLOCK channels."""
    sample_series = name.startswith("s")
    shape = {"1x1": (8, 160, 1, 1) if sample_series else (40, 16, 1, 1),
             "5x7": (4, 160, 5, 7) if sample_series else (40, 8, 5, 7)}[maps]
    fast, ref = (layer.to(device) for layer in make_pair(name, shape[1], **({"groups": 2} if sample_series else {})))
    x, grad_y = sample(shape).to(device), sample(shape, seed=2).to(device)
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
        assert_close(got, want)
    series = "sample" if name.startswith("s") else "batch"
    assert triton_stages == [f"{series}_forward", f"{series}_backward"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["b0", "b2", "s0", "s2"])
def test_autocast_half_on_triton(name, dtype, device, triton_stages):
    conv = torch.nn.Conv2d(3, 32, 3).to(device)
    x = sample((4, 3, 9, 8)).to(device)
    outputs = []
    for layer in make_pair(name, 32):
        layer.to(device)
        with torch.autocast(device, dtype=dtype):
            y = layer(conv(x))
        y.float().square().sum().backward()
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        outputs.append(y.float())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    assert triton_stages and not fused._triton_state["failed"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["b0", "s0"])
def test_half_inputs_read_and_written_directly(name, dtype, device, triton_stages):
    """A half input goes to the kernels as it is (no float32 copy) and matches the reference on the same values."""
    fast, ref = (layer.to(device) for layer in make_pair(name, 24))
    x, grad_y = sample((3, 24, 5, 4), dtype).to(device), sample((3, 24, 5, 4), dtype, seed=2).to(device)
    got, want = run(fast, x, grad_y), run(ref, x, grad_y)
    assert got[0].dtype == got[1].dtype == dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * max(1.0, w.abs().max().item()))
    assert triton_stages


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["b0", "s2"])
def test_channels_last_and_retained_graph(name, device, triton_stages):
    """A channels-last input; a second backward through the same graph (the parameter gradients of the first are
    views of the forward's workspace and must not change)."""
    fast, ref = (layer.to(device) for layer in make_pair(name, 16))
    x = sample((3, 16, 4, 5)).to(device).to(memory_format=torch.channels_last)
    grad_y = sample((3, 16, 4, 5), seed=2).to(device)
    grads = []
    for layer in (fast, ref):
        y = layer(x)
        y.backward(grad_y, retain_graph=True)
        first = [p.grad.clone() for p in layer.parameters()]
        y.backward(grad_y * 2)
        grads.append([p.grad for p in layer.parameters()])
        for p, g in zip(grads[-1], first):
            assert_close(p, 3 * g)
    for g, w in zip(*grads):
        assert_close(g, w)


def test_triton_policy(monkeypatch):
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._triton_state, "failed", False)
    x, weight = torch.zeros(2, 8, 4, 4), torch.ones(8)
    assert not fused._use_triton(x, weight)  # CPU: unchanged (eager below COMPILE_MIN_NUMEL)
    monkeypatch.setitem(fused._triton_state, "force", True)
    assert all(fused._use_triton(x.to(dtype), weight) for dtype in fused.TRITON_DTYPES)
    assert not fused._use_triton(x.double(), weight)  # float64 keeps its precision in the eager stages
    assert not fused._use_triton(x, weight.double())
    fused.set_compile("off")  # off: eager stages on every device
    assert not fused._use_triton(x, weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("failing", ["batch_forward", "batch_backward"])
def test_failed_triton_launch_warns_once_and_falls_back(failing, device, triton_stages, monkeypatch, caplog):
    from evonorm import triton_kernels

    def broken(*args):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(triton_kernels, failing, broken)
    fast, ref = (layer.to(device) for layer in make_pair("b0", 16))
    x, grad_y = sample((4, 16, 5, 5)).to(device), sample((4, 16, 5, 5), seed=2).to(device)
    with caplog.at_level(logging.WARNING, logger="evonorm.fused"):
        got = run(fast, x, grad_y)
        run(make_pair("b0", 16)[0].to(device), x, grad_y)
    assert fused._triton_state["failed"] and caplog.text.count("Triton stages failed") == 1
    # a failed forward: all eager from then on; a failed backward: its forward's workspace feeds the eager backward
    assert triton_stages == ["batch_forward"] if failing == "batch_forward" else ["batch_forward", "batch_backward"]
    for a, b in zip(got, run(ref, x, grad_y)):
        assert_close(a, b)


def _launch_labels(record, known):
    """The recorded launcher calls with each tensor named: by its role in ``known`` (identity) or, for a tensor
    allocated by the call, by dtype and shape; launch metadata (made per launch where a launch hook is set) by
    kernel name."""
    def label(arg):
        if isinstance(arg, torch.Tensor):
            return next((k for k, t in known.items() if t is arg), ("new", arg.dtype, tuple(arg.shape)))
        if type(arg).__name__ == "LazyDict":
            return "launch metadata", arg.data["name"]
        return arg
    return [tuple(label(a) for a in call) for call in record]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs its own functions, not compiled kernels")
@pytest.mark.parametrize("shape", [(4, 16, 3, 5), (64, 16, 7, 7), (2, 16, 40, 40)],
                         ids=["whole_sets", "whole_sets_16_warps", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, training", CASES)
def test_direct_launches_pass_what_triton_passes(name, training, dtype, shape, monkeypatch):
    """Once a kernel is compiled, _launch calls it directly: with the grid, stream, kernel, launch hooks and
    parameters in the order that Triton's own launch (kernel[grid]) passes them, on every launch of a forward +
    backward (a stand-in CUDA driver records the launcher calls; this checks the installed Triton)."""
    pytest.importorskip("triton")
    from evonorm import triton_kernels

    layer = make_pair(name, shape[1], training)[0]
    x = sample(shape, dtype).requires_grad_()
    grad_y = sample(shape, dtype, seed=2)
    known = {"x": x, "grad_y": grad_y, **dict(layer.named_parameters()), **dict(layer.named_buffers())}
    calls = {}
    for direct in (False, True):  # through Triton; then direct, from the second call on
        record = []
        monkeypatch.setattr(triton_kernels, "DIRECT_LAUNCH", direct)
        with simulated_cuda_launches(record):
            layer(x).backward(grad_y)  # x is contiguous: the kernels get x itself
            if direct:
                record.clear()
                layer(x).backward(grad_y)
            compiled_keys = len(triton_kernels._compiled)
        calls[direct] = record
        assert compiled_keys == (len(record) if direct else 0)
    whole_sets = triton_kernels._plan(x.shape, None if name[0] == "b" else layer.groups).whole_sets
    forward_launches = 1 if whole_sets else 2
    backward_launches = 1 if whole_sets and name[0] == "b" else 2
    assert len(calls[True]) == len(calls[False]) == forward_launches + backward_launches
    # the stand-in kernels of the two runs differ (each run compiles anew): compare all but the kernel handle
    strip = [call[:4] + call[5:] for call in _launch_labels(calls[True], known)]
    assert strip == [call[:4] + call[5:] for call in _launch_labels(calls[False], known)]
    assert all("x" in call for call in strip) and sum("grad_y" in call for call in strip) == backward_launches


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs its own functions, not compiled kernels")
def test_direct_launch_key_follows_triton_specialisation():
    """A tensor of another dtype or alignment (which Triton compiles anew for) gets its own compiled kernel, not the
    one of an earlier launch: the direct launch uses the kernel that Triton's own launch compiled for it."""
    pytest.importorskip("triton")
    from evonorm import triton_kernels

    base = torch.zeros(65)
    inputs = [base[:64], base[:64], base[1:], base[1:], base[:64].bfloat16(), base[:64].bfloat16()]
    record = []
    with simulated_cuda_launches(record):
        ws = torch.zeros(1024)
        for x in inputs:  # moments of 4 rows of 16
            triton_kernels._launch(triton_kernels._moments_kernel, (1,), ws, x, 4, 16, 1, BLOCK_R=4, BLOCK_L=16)
    functions = [call[4] for call in record]  # the compiled kernel of each launch
    assert functions[0] == functions[1] and functions[2] == functions[3] and functions[4] == functions[5]
    assert len(set(functions)) == 3


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs its own functions, not compiled kernels")
def test_direct_launch_of_another_interface_falls_back_to_triton(monkeypatch, caplog):
    """A Triton whose compiled kernels take other arguments (here: no launch hooks where _launch looks for them):
    the first direct launch raises before launching, warns, and it and every later launch go through kernel[grid]."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from evonorm import triton_kernels

    layer = make_pair("s0", 16)[0]
    x, grad_y = sample((2, 16, 3, 3)).requires_grad_(), sample((2, 16, 3, 3), seed=2)
    record = []
    monkeypatch.setattr(triton_kernels, "DIRECT_LAUNCH", True)
    with simulated_cuda_launches(record), caplog.at_level(logging.WARNING, logger="evonorm.triton_kernels"):
        layer(x).backward(grad_y)  # compiles: every launch through kernel[grid]
        launches = len(record)
        monkeypatch.setattr(triton_kernels, "knobs", SimpleNamespace(runtime=SimpleNamespace(debug=False),
                                                                    compilation=SimpleNamespace()))
        for _ in range(2):
            layer(x).backward(grad_y)
    assert len(record) == 3 * launches and not triton_kernels.DIRECT_LAUNCH and not fused._triton_state["failed"]
    assert caplog.text.count("direct Triton launches failed") == 1


# (kernel, constexpr specialisation, tensor dtype): together every constexpr branch, float32 and bfloat16 tensors
CUDA_BUILDS = [
    ("_moments_kernel", {}, "fp32"),
    ("_batch_forward_kernel", {"VARIANT": 0, "TRAINING": True}, "bf16"),
    ("_batch_forward_kernel", {"VARIANT": 1, "TRAINING": False}, "fp32"),
    ("_batch_sums_kernel", {"VARIANT": 2}, "fp16"),
    ("_batch_grad_x_kernel", {"VARIANT": 1, "TRAINING": True}, "bf16"),
    ("_batch_grad_x_kernel", {"VARIANT": 2, "TRAINING": False}, "fp32"),
    ("_sample_forward_kernel", {"HAS_V": True, "CENTERED": False}, "bf16"),
    ("_sample_sums_kernel", {"HAS_V": False}, "fp32"),
    ("_sample_grad_x_kernel", {"HAS_V": True, "CENTERED": True}, "fp32"),
    ("_sample_grad_x_kernel", {"HAS_V": False, "CENTERED": False}, "bf16"),
    ("_batch_forward_set_kernel", {"VARIANT": 0, "TRAINING": True}, "bf16"),
    ("_batch_forward_set_kernel", {"VARIANT": 2, "TRAINING": False}, "fp32"),
    ("_batch_backward_set_kernel", {"VARIANT": 1, "TRAINING": True}, "fp32"),
    ("_batch_backward_set_kernel", {"VARIANT": 0, "TRAINING": False}, "bf16"),
    ("_sample_forward_set_kernel", {"HAS_V": True, "CENTERED": True}, "fp32"),
    ("_sample_forward_set_kernel", {"HAS_V": False, "CENTERED": False}, "bf16"),
]


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels, which the interpreter replaces")
def test_kernels_compile_for_cuda():
    """Every kernel compiles to a CUDA binary (sm_90) without a GPU: what the interpreter cannot check (typing of
    loop-carried values, constexpr branches, pointer casts)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from evonorm import triton_kernels

    pointers = {"ws_ptr", "w_ptr", "bias_ptr", "v_ptr", "rv_ptr"}
    tensors = {"x_ptr", "y_ptr", "gy_ptr", "gx_ptr"}
    blocks = {"BLOCK_R": 16, "BLOCK_M": 16, "BLOCK_L": 64, "BLOCK_N": 32, "BLOCK_G": 4}
    for name, constexprs, dtype in CUDA_BUILDS:
        kernel = getattr(triton_kernels, name)
        params = list(kernel.signature.parameters)
        whole_set = name.endswith("_set_kernel")  # as for a 64 x 64 set: the largest tile, 16 warps
        sizes = {**blocks, "BLOCK_M": 64} if whole_set else blocks
        constexprs = {**constexprs, **{k: v for k, v in sizes.items() if k in params}}
        signature = {p: "constexpr" if p in constexprs else "*fp32" if p in pointers else f"*{dtype}"
                     if p in tensors else "fp32" if p in ("eps", "momentum") else "i32" for p in params}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 16} if whole_set else None)
        except RuntimeError as err:
            if "ptxas" in str(err) and "not found" in str(err):
                pytest.skip(f"no ptxas for the CUDA backend: {err}")
            raise
        assert compiled.asm["cubin"], name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("launch", ["python", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["b0", "s0"])
def test_cuda_graph_captures_forward_backward(name, dtype, launch, monkeypatch):
    """A training forward + backward captured in a CUDA graph and replayed gives what an eager call gives: no
    launch syncs with the host or allocates outside the graph's pool; with native launches too (evonorm.
    triton_native: the warm-up's first call records them)."""
    import copy

    import evonorm
    from evonorm import triton_native

    monkeypatch.setitem(fused._compile_state, "mode", "auto")  # the Triton stages
    monkeypatch.setitem(triton_native._state, "mode", launch)
    monkeypatch.setitem(triton_native._state, "failed", False)
    layer = evonorm.norm_act(name, 64, impl="fast").cuda().train()
    x = torch.randn(8, 64, 12, 10, device="cuda", dtype=dtype, requires_grad=True)
    grad_y = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream (Triton compiles here), as capture requires
        for _ in range(2):
            layer(x).backward(grad_y)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    eager = copy.deepcopy(layer)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(grad_y)
    assert (type(y.grad_fn).__name__ == "CppFunction") == (launch == "native")
    graph.replay()
    x_eager = x.detach().clone().requires_grad_()
    y_eager = eager(x_eager)
    y_eager.backward(grad_y)
    torch.cuda.synchronize()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(y, y_eager, tol)
    assert_close(x.grad, x_eager.grad, tol)
    for got, want in zip(layer.parameters(), eager.parameters()):
        assert_close(got.grad, want.grad, tol * 10)
    for got, want in zip(layer.buffers(), eager.buffers()):
        assert_close(got, want, tol)
